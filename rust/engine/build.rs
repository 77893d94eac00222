//! Short names for the target-feature sets the CPU kernels are compiled for, so that each
//! kernel says `#[cfg(avx2)]` rather than repeating the whole predicate.

use cfg_aliases::cfg_aliases;

fn main() {
    cfg_aliases! {
        // AVX2 with FMA and F16C (x86-64-v3's vector features): every SIMD kernel's baseline.
        avx2: { all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c") },
        // AVX-512 F, BW and VNNI: the K-quant and Q4_1 panels and 8-row tiles.
        avx512: { all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw", target_feature = "avx512vnni") },
        // VNNI on 256-bit vectors (AVX-512 VL): the Q8_0 kernel's byte dot products.
        avx512_vl_vnni: { all(target_arch = "x86_64", target_feature = "avx512vnni", target_feature = "avx512vl") },
    }
}
