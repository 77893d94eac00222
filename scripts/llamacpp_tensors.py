#!/usr/bin/env python3
"""Dumps llama.cpp's intermediate F32 tensors (the graph's named nodes: ``attn_norm-0``,
``Qcur-0``, ``kq_soft_max-0``, ``kqv_out-0``, ``ffn_swiglu-0``, ``result_norm``…) while it
evaluates token ids, to compare our arithmetic with its own step by step.

    python scripts/llamacpp_tensors.py MODEL.gguf OUT.npz "[1, 4093, 198]" ["[30]"]

The first list is evaluated as one batch; a second list, if given, is evaluated after it (one
token is a decode step) and only its tensors are kept. Keys are ``NNNN:name`` in graph order,
arrays in ggml's dimension order reversed (``[ne3, ne2, ne1, ne0]``). Runs llama.cpp as
scripts/make_references.py does: F32 KV cache, no flash attention, 2 threads.
Needs llama-cpp-python and numpy; reads ``struct ggml_tensor`` through ctypes (the layout of
ggml.h with GGML_MAX_SRC = 10, as in llama-cpp-python 0.3.x).
"""

from __future__ import annotations

import ctypes
import json
import sys

import llama_cpp as L
import numpy as np


class GgmlTensor(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
                ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10),
                ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def main() -> None:
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    path, out = sys.argv[1], sys.argv[2]
    batches = [json.loads(a) for a in sys.argv[3:]]
    dumps: dict[str, np.ndarray] = {}

    @L.ggml_backend_sched_eval_callback
    def collect(t, ask, _user):
        if ask:
            return True
        tt = ctypes.cast(t, ctypes.POINTER(GgmlTensor)).contents
        ne, nb = list(tt.ne), list(tt.nb)
        n = ne[0] * ne[1] * ne[2] * ne[3]
        contiguous = nb[0] == 4 and nb[1] == 4 * ne[0] and nb[2] == nb[1] * ne[1]
        if tt.type == 0 and tt.data and contiguous:  # F32
            a = np.ctypeslib.as_array(ctypes.cast(tt.data, ctypes.POINTER(ctypes.c_float)), shape=(n,)).copy()
            dumps[f"{len(dumps):04d}:{tt.name.decode()}"] = a.reshape(ne[3], ne[2], ne[1], ne[0])
        return True

    L.llama_backend_init()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    params = L.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_threads, params.n_threads_batch = 512, 512, 2, 2
    params.type_k = params.type_v = 0  # GGML_TYPE_F32
    params.flash_attn_type = 0  # disabled
    params.cb_eval = collect
    ctx = L.llama_init_from_model(model, params)
    for ids in batches:
        dumps.clear()
        arr = (ctypes.c_int32 * len(ids))(*ids)
        if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids))) != 0:
            sys.exit("llama_decode failed")
    np.savez(out, **dumps)
    print(f"{out}: {len(dumps)} tensors")


if __name__ == "__main__":
    main()
