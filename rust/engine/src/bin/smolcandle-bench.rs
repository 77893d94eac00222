//! Prints prefill and decode tokens/s for a GGUF file.
//!
//! usage: smolcandle-bench MODEL.gguf [--prompt-tokens 512] [--gen-tokens 128] [--threads N]
//!        [--repeats 3] [--device cpu] [--kv-cache-dtype f32] [--json] [--verify-rows 2,4,8]
//!
//! Decoding is plain (no speculative drafts), so that the figure is the kernels'. With
//! `--verify-rows`, it also prints what a step of each number of rows (a token and its draft,
//! every row's logits) costs against a step of one, after the prompt: the median of 16 steps
//! each.

use std::process::ExitCode;
use std::time::Instant;

use smolcandle_engine::{Engine, Event, GenerateRequest, LoadOptions, SamplingParams};

struct Args {
    model: String,
    prompt_tokens: usize,
    gen_tokens: usize,
    threads: Option<usize>,
    repeats: usize,
    device: String,
    kv_cache_dtype: Option<String>,
    json: bool,
    verify_rows: Vec<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        model: String::new(),
        prompt_tokens: 512,
        gen_tokens: 128,
        threads: None,
        repeats: 3,
        device: "cpu".into(),
        kv_cache_dtype: None,
        json: false,
        verify_rows: Vec::new(),
    };
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let num = |v: String, name: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{name}: {v:?} is not a number"))
        };
        match a.as_str() {
            "--prompt-tokens" => args.prompt_tokens = num(value(&a)?, &a)?,
            "--gen-tokens" => args.gen_tokens = num(value(&a)?, &a)?,
            "--threads" => args.threads = Some(num(value(&a)?, &a)?),
            "--repeats" => args.repeats = num(value(&a)?, &a)?.max(1),
            "--device" => args.device = value(&a)?,
            "--kv-cache-dtype" => args.kv_cache_dtype = Some(value(&a)?),
            "--json" => args.json = true,
            "--verify-rows" => {
                args.verify_rows = value(&a)?
                    .split(',')
                    .map(|v| num(v.trim().to_string(), "--verify-rows"))
                    .collect::<Result<_, _>>()?;
                if args.verify_rows.iter().any(|&n| n == 0 || n > 64) {
                    return Err("--verify-rows: each from 1 to 64".into());
                }
            }
            "-h" | "--help" => {
                return Err(
                    "usage: smolcandle-bench MODEL.gguf [--prompt-tokens N] [--gen-tokens N] \
                            [--threads N] [--repeats N] [--device cpu|cuda[:N]] \
                            [--kv-cache-dtype f32|f16|q8_0] [--json] \
                            [--verify-rows 2,4,8]"
                        .into(),
                )
            }
            _ if args.model.is_empty() && !a.starts_with('-') => args.model = a,
            _ => return Err(format!("unexpected argument {a:?}")),
        }
    }
    if args.model.is_empty() {
        return Err("missing MODEL.gguf (see --help)".into());
    }
    Ok(args)
}

/// A deterministic prompt of exactly `n` tokens drawn from ordinary vocabulary entries.
fn prompt(engine: &Engine, n: usize) -> Vec<u32> {
    let text = "The quick brown fox jumps over the lazy dog while the engineers measure how fast \
                their decoder reads a long prompt and writes a short answer. ";
    let ids = engine.tokenizer().encode(text, false, false);
    ids.iter().copied().cycle().take(n).collect()
}

fn run(args: &Args) -> Result<(), String> {
    let t0 = Instant::now();
    let engine = Engine::load(
        &args.model,
        &LoadOptions {
            device: args.device.clone(),
            n_threads: args.threads,
            n_ctx: Some(args.prompt_tokens + args.gen_tokens + 8),
            kv_cache_dtype: args.kv_cache_dtype.clone(),
            // Every run must compute its prompt: no reuse of the previous run's cache.
            prefix_cache_bytes: Some(0),
            speculative: Some(false),
            ..LoadOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let load_s = t0.elapsed().as_secs_f64();
    let prompt = prompt(&engine, args.prompt_tokens);
    let (mut best_prefill, mut best_decode) = (0.0f64, 0.0f64);
    // One warm-up run, then the best of `repeats` (as llama-bench reports steady state).
    for i in 0..=args.repeats {
        let stream = engine
            .generate(GenerateRequest {
                // Every run decodes exactly gen_tokens, as llama-bench does.
                ignore_eog: true,
                ..GenerateRequest::new(prompt.clone(), args.gen_tokens, SamplingParams::greedy())
            })
            .map_err(|e| e.to_string())?;
        let usage = loop {
            match stream.recv() {
                Some(Event::Done { usage, .. }) => break usage,
                Some(Event::Error(e)) => return Err(e),
                Some(Event::Chunk { .. }) => {}
                None => return Err("the engine stopped".into()),
            }
        };
        if i == 0 {
            continue;
        }
        let prefill = usage.prompt_tokens as f64 / usage.prefill_seconds;
        // The first token comes from the prefill; the rest are decode steps.
        let decode = (usage.completion_tokens.saturating_sub(1)) as f64 / usage.decode_seconds;
        best_prefill = best_prefill.max(prefill);
        best_decode = best_decode.max(decode);
    }
    let threads = smolcandle_threads();
    let verify = verify_costs(&engine, &prompt, &args.verify_rows).map_err(|e| e.to_string())?;
    if args.json {
        let verify: Vec<String> = verify
            .iter()
            .map(|(rows, ratio)| format!("\"{rows}\": {ratio:.4}"))
            .collect();
        println!(
            "{{\"model\": {:?}, \"threads\": {threads}, \"prompt_tokens\": {}, \"gen_tokens\": {}, \
             \"load_seconds\": {load_s:.3}, \"prefill_tps\": {best_prefill:.2}, \"decode_tps\": {best_decode:.2}, \
             \"verify_cost\": {{{}}}}}",
            args.model,
            args.prompt_tokens,
            args.gen_tokens,
            verify.join(", ")
        );
    } else {
        println!("model        {}", args.model);
        println!("threads      {threads}");
        println!("load         {load_s:.2} s");
        println!(
            "prefill      {best_prefill:.1} tokens/s ({} tokens)",
            args.prompt_tokens
        );
        println!(
            "decode       {best_decode:.1} tokens/s ({} tokens)",
            args.gen_tokens
        );
        for (rows, ratio) in &verify {
            println!("verify {rows:>2}    {ratio:.3}x a one-row step");
        }
    }
    Ok(())
}

/// For each of `rows`, a step of that many rows (every row's logits, as a verified draft
/// takes them) after `prompt`, against a step of one row: medians of 16 steps, alternating.
fn verify_costs(
    engine: &Engine,
    prompt: &[u32],
    rows: &[usize],
) -> smolcandle_engine::Result<Vec<(usize, f64)>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let model = engine.model();
    let mut cache = model.new_cache();
    model.forward(prompt, &mut cache, false)?;
    let base = cache.len();
    let tokens: Vec<u32> = prompt.iter().copied().cycle().take(64).collect();
    let mut step = |n: usize| -> smolcandle_engine::Result<f64> {
        let t = Instant::now();
        model.forward(&tokens[..n], &mut cache, true)?;
        let seconds = t.elapsed().as_secs_f64();
        cache.truncate(base);
        Ok(seconds)
    };
    step(1)?; // warm-up
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let mut out = Vec::new();
    for &n in rows {
        let (mut one, mut many) = (Vec::new(), Vec::new());
        for _ in 0..16 {
            one.push(step(1)?);
            many.push(step(n)?);
        }
        out.push((n, median(many) / median(one)));
    }
    Ok(out)
}

fn smolcandle_threads() -> usize {
    std::env::var("CANDLE_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(candle_core::utils::get_num_threads)
}

fn main() -> ExitCode {
    match parse_args().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smolcandle-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
