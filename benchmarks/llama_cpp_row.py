"""The llama.cpp row of the generation benchmark: the same model, prompts, stop rules and new-token
budget through llama.cpp (llama-cpp-python's bindings), with parallel sequences and the same threads.

The model: the embedded GGUF is Q4_1, which is not what fedpit runs (transformers dequantises it to
bf16/fp32 when it loads it). `dense_gguf` has llama.cpp rewrite the same weights, dequantised, in the
dtype fedpit's handle runs (BF16 where the CPU computes bf16, F32 elsewhere), so both engines compute
with the same numbers in the same dtype.
The adapter the bench attaches is freshly initialised (B = 0), so the base weights are the model.

The decode loop is llama.cpp's batched API (one `llama_decode` per step over every unfinished
sequence, each sequence its own KV cells, a finished sequence's slot taken by the next waiting
prompt), driven from Python as fedpit's loop is: prompts are
tokenised by the same Hugging Face tokenizer, the repetition penalty is transformers' rule (every
token of prompt and output, logits divided or multiplied by the penalty), and a row ends at EOS, a
stop string or the budget. That per-step Python costs llama.cpp a little; it is the same work
fedpit's loop does.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


def dense_gguf(source: Path, target: Path, dtype: str) -> Path:
    """`source` rewritten by llama.cpp's own quantizer (`llama_model_quantize`, allowed to requantize) with
    its 2-D tensors in `dtype` ("bf16" or "fp32"), metadata and tokenizer unchanged."""
    import llama_cpp as lc

    if target.is_file():
        return target
    params = lc.llama_model_quantize_default_params()
    params.ftype = {"bf16": lc.LLAMA_FTYPE_MOSTLY_BF16, "fp32": lc.LLAMA_FTYPE_ALL_F32}[dtype]
    params.allow_requantize = True
    partial = target.with_name(target.name + ".part")
    if lc.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not rewrite {source} as {dtype}")
    partial.rename(target)
    return target


class LlamaCppBatched:
    """Greedy batched generation with llama.cpp: every prompt its own sequence, decoded together."""

    def __init__(self, gguf_path: Path, tokenizer, max_sequences: int, max_tokens_per_sequence: int,
                 threads: int) -> None:
        import llama_cpp as lc

        self.lc, self.tokenizer = lc, tokenizer
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        params = lc.llama_context_default_params()
        params.n_ctx = max_sequences * max_tokens_per_sequence
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = max_sequences
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(512, 0, 1)
        self.max_sequences = max_sequences

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> dict[int, np.ndarray]:
        """Feed (token, position, sequence, wants_logits) entries in chunks of the batch size; the next-token
        logits of each sequence that asked, copied out after its chunk (the next `llama_decode` reuses
        the output buffer)."""
        logits: dict[int, np.ndarray] = {}
        for start in range(0, len(entries), 512):
            chunk = entries[start:start + 512]
            b = self.batch
            for i, (token, pos, seq, wants) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
                b.seq_id[i][0] = seq
                b.logits[i] = wants
            b.n_tokens = len(chunk)
            if self.lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed (the KV cache may be too small)")
            for i, (_, _, seq, wants) in enumerate(chunk):
                if wants:
                    pointer = self.lc.llama_get_logits_ith(self.ctx, i)
                    logits[seq] = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                                                        shape=(self.n_vocab,)).copy()
        return logits

    def generate(self, prompts: list[str], max_new_tokens: int, stop_strings: tuple[str, ...],
                 repetition_penalty: float, stop_enders: frozenset[int]) -> list[str]:
        """Every prompt through `max_sequences` slots: a slot whose row ended takes the next waiting
        prompt, whose tokens go into the same `llama_decode` batch as the other slots' next tokens
        (llama.cpp's server schedules the same way)."""
        from fedpit.engines.stops import cut_at_stop

        tok, lc = self.tokenizer, self.lc
        memory = lc.llama_get_memory(self.ctx)
        lc.llama_memory_clear(memory, True)
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        ids = [tok(p)["input_ids"] for p in prompts]
        waiting = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))  # longest first, as fedpit's loop
        new: list[list[int]] = [[] for _ in prompts]
        seen = [set(row) for row in ids]
        slots: dict[int, int] = {}  # slot (llama.cpp sequence id) -> prompt
        logits: dict[int, np.ndarray] = {}
        entries: list[tuple[int, int, int, bool]] = []
        while waiting or slots:
            for slot in range(self.max_sequences):  # free slots take waiting prompts
                if slot not in slots and waiting:
                    prompt = slots[slot] = waiting.pop(0)
                    lc.llama_memory_seq_rm(memory, slot, -1, -1)
                    row = ids[prompt]
                    entries += [(t, pos, slot, pos == len(row) - 1) for pos, t in enumerate(row)]
            logits.update(self._decode(entries))
            entries = []
            for slot, prompt in list(slots.items()):
                scores = logits[slot]
                if repetition_penalty != 1.0:
                    index = np.fromiter(seen[prompt], dtype=np.int64)
                    picked = scores[index]
                    scores[index] = np.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
                token = int(scores.argmax())
                done = token in eos
                if not done:
                    new[prompt].append(token)
                    seen[prompt].add(token)
                    done = len(new[prompt]) >= max_new_tokens
                if not done and token in stop_enders:
                    text = tok.decode(new[prompt], skip_special_tokens=True)
                    done = cut_at_stop(text, stop_strings) != text
                if done:
                    del slots[slot]
                else:
                    entries.append((token, len(ids[prompt]) + len(new[prompt]) - 1, slot, True))
        return [cut_at_stop(tok.decode(row, skip_special_tokens=True), stop_strings) for row in new]
