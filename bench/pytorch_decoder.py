#!/usr/bin/env python3
"""The PyTorch baseline for bench/cpu_decode.sh and the GPU decode benchmark: a careful eager
decoder of the same model (latent KV cache with kv_b absorbed, only the selected experts
computed, incremental n-gram hashing), timed like troupe_bench_model and printing the same JSON.
On the CPU the weights are float32; with --device cuda they are bfloat16 on the GPU (the router
stays float32), and --compile runs the forward through torch.compile. --batch B decodes B
sequences together (distinct prompts of the same length, so they share positions); tokens/s
are then totals over the batch. --static decodes one sequence with StaticDecoder (static
shapes; with --compile, torch.compile(mode="reduce-overhead"): the step one CUDA graph), the
baseline a tuned compiled decoder sets; its prompt goes through the same one-token step.

    pytorch_decoder.py MODEL_DIR PROMPT_TOKENS DECODE_TOKENS THREADS [--device cuda] [--compile] [--batch B | --static]
"""
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
from longcat_reference import load_weights, rope_inv_freq, softmax_scale  # noqa: E402

torch.set_grad_enabled(False)


class Decoder:
    def __init__(self, model_dir, device="cpu"):
        self.cfg = c = json.load(open(os.path.join(model_dir, "config.json")))
        self.dev = device
        low = torch.bfloat16 if device != "cpu" else torch.float32
        self.w = {k: v.to(device=device, dtype=torch.float32 if "router" in k else low).contiguous()
                  for k, v in load_weights(model_dir).items()}
        self.ngram = "Ngram" in c["architectures"][0]
        self.eps = c["rms_norm_eps"]
        self.nh, self.nope, self.rope_dim, self.vd = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.lora = c["kv_lora_rank"]
        inv, self.af = rope_inv_freq(c)
        self.inv_freq = inv.to(device=device, dtype=torch.float32)
        self.scale = softmax_scale(c)
        V = c["vocab_size"]
        if self.ngram:
            N, K = c["emb_neighbor_num"], c["emb_split_num"]
            m = int(math.floor(c["ngram_vocab_size_ratio"] * V))
            sizes = c.get("ngram_table_sizes") or [m + 2 * i + 1 for i in range(K * (N - 1))]
            self.tables = [(2 + i // K, M, [pow(V, k, M) for k in range(1, 2 + i // K)]) for i, M in enumerate(sizes)]
            self.keep = N - 1
        # Absorbed MLA weights per attention layer: W_k [nh, nope, lora], W_v [nh, vd, lora].
        self.absorbed = {}
        for l in range(c["num_layers"]):
            for j in (0, 1):
                p = f"model.layers.{l}.self_attn.{j}."
                kvb = self.w[p + "kv_b_proj.weight"].view(self.nh, self.nope + self.vd, self.lora)
                self.absorbed[p] = (kvb[:, : self.nope].contiguous(), kvb[:, self.nope :].contiguous())

    def rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def hash_ids(self, tokens, ctx):
        out = []
        for x in tokens:
            out.append([(x + sum(ctx[-k] * p for k, p in enumerate(pw, 1) if k <= len(ctx))) % M for _, M, pw in self.tables])
            if x == self.cfg["eos_token_id"]:
                ctx.clear()
            else:
                ctx.append(x)
                del ctx[: max(0, len(ctx) - self.keep)]
        return torch.tensor(out, device=self.dev)

    def embed(self, tokens, state):  # tokens: B lists of T ids -> rows [B * T, H]
        w = self.w
        flat = [x for seq in tokens for x in seq]
        x = w["model.embed_tokens.weight"][torch.tensor(flat, device=self.dev)]
        if self.ngram:
            ids = torch.cat([self.hash_ids(seq, ctx) for seq, ctx in zip(tokens, state["ctx"])])
            for i in range(ids.shape[1]):
                x = x + w[f"model.ngram_embeddings.embedders.{i}.weight"][ids[:, i]] @ w[f"model.ngram_embeddings.post_projs.{i}.weight"].T
            x = x / (1 + ids.shape[1])
        return x

    def apply_rope(self, x, pos):  # x [B, T, ..., r]: interleaved pairs (the same dot products as de-interleaved)
        ang = pos[:, None].to(torch.float32) * self.inv_freq[None, :]
        shape = (1, pos.shape[0]) + (1,) * (x.dim() - 3) + (ang.shape[-1],)
        cos, sin = (ang.cos() * self.af).to(x.dtype).view(shape), (ang.sin() * self.af).to(x.dtype).view(shape)
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)

    def mla_inputs(self, p, x, pos, B, T):  # q_nope, roped q_rope [B, T, heads, .]; latent, roped k_rope [B, T, .]
        w, c = self.w, self.cfg
        if c.get("q_lora_rank"):
            q = self.rms(x @ w[p + "q_a_proj.weight"].T, w[p + "q_a_layernorm.weight"]) @ w[p + "q_b_proj.weight"].T
            if c.get("mla_scale_q_lora", True):
                q = q * math.sqrt(c["hidden_size"] / c["q_lora_rank"])
        else:
            q = x @ w[p + "q_proj.weight"].T
        q = q.view(B, T, self.nh, self.nope + self.rope_dim)
        kv = (x @ w[p + "kv_a_proj_with_mqa.weight"].T).view(B, T, -1)
        lat = self.rms(kv[..., : self.lora], w[p + "kv_a_layernorm.weight"])
        if c.get("mla_scale_kv_lora", True):
            lat = lat * math.sqrt(c["hidden_size"] / self.lora)
        return q[..., : self.nope], self.apply_rope(q[..., self.nope :], pos), lat, self.apply_rope(kv[..., self.lora :], pos)

    def attend(self, p, q_nope, q_rope, lat, k_rope, pos):  # over the cached latents [B, S, .]: [B * T, H]
        B, T = q_nope.shape[:2]
        wk, wv = self.absorbed[p]
        q_lat = torch.einsum("btkn,knl->bktl", q_nope, wk)
        scores = (q_lat @ lat.unsqueeze(1).transpose(-1, -2) + torch.einsum("btkr,bsr->bkts", q_rope, k_rope)) * self.scale
        mask = torch.arange(lat.shape[1], device=self.dev)[None, :] > pos[:, None]
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        out = probs @ lat.unsqueeze(1)  # [B, heads, T, lora]
        out = torch.einsum("bktl,kvl->btkv", out, wv).reshape(B * T, self.nh * self.vd)
        return out @ self.w[p + "o_proj.weight"].T

    def mla(self, p, x, pos, state, B):
        q_nope, q_rope, lat, k_rope = self.mla_inputs(p, x, pos, B, x.shape[0] // B)
        cache = state["cache"].setdefault(p, [None, None])
        cache[0] = lat if cache[0] is None else torch.cat([cache[0], lat], dim=1)
        cache[1] = k_rope if cache[1] is None else torch.cat([cache[1], k_rope], dim=1)
        return self.attend(p, q_nope, q_rope, cache[0], cache[1], pos)

    def swiglu(self, p, x):
        w = self.w
        return (torch.nn.functional.silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)) @ w[p + "down_proj.weight"].T

    def moe(self, p, x):
        c, w = self.cfg, self.w
        probs = (x.float() @ w[p + "router.classifier.weight"].T).softmax(-1)  # the router in float32
        idx = torch.topk(probs + w[p + "router.e_score_correction_bias"], c["moe_topk"], dim=-1).indices
        gate = (probs.gather(1, idx) * c["routed_scaling_factor"]).to(x.dtype)
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            y = self.swiglu(f"{p}experts.{e}.", x[rows]) if e < c["n_routed_experts"] else x[rows]
            out.index_add_(0, rows, y * gate[rows, slot, None])
        return out

    def forward(self, tokens, state):  # tokens: B lists of T ids; logits of each sequence's last token [B, V]
        w, c, B, T = self.w, self.cfg, len(tokens), len(tokens[0])
        pos = torch.arange(state["n"], state["n"] + T, device=self.dev)
        h = self.embed(tokens, state)
        for l in range(c["num_layers"]):
            p = f"model.layers.{l}."
            a = h + self.mla(p + "self_attn.0.", self.rms(h, w[p + "input_layernorm.0.weight"]), pos, state, B)
            u = self.rms(a, w[p + "post_attention_layernorm.0.weight"])
            shortcut = self.moe(p + "mlp.", u)
            b = a + self.swiglu(p + "mlps.0.", u)
            cc = b + self.mla(p + "self_attn.1.", self.rms(b, w[p + "input_layernorm.1.weight"]), pos, state, B)
            h = cc + self.swiglu(p + "mlps.1.", self.rms(cc, w[p + "post_attention_layernorm.1.weight"])) + shortcut
        state["n"] += T
        return self.rms(h.view(B, T, -1)[:, -1], w["model.norm.weight"]) @ w["lm_head.weight"].T


class StaticDecoder(Decoder):
    """Batch-1 decode written the way a tuned torch.compile decoder is (gpt-fast style), for
    --static: one token per step with static shapes, so torch.compile(mode="reduce-overhead")
    captures the whole step as a CUDA graph: latent caches preallocated as buffers and written at
    a position held in a tensor, attention masked over the full cache, the MoE routed without a
    host sync (the selected experts' weights indexed on the device), n-gram ids hashed on the
    host and passed in."""

    def __init__(self, model_dir, device, max_len):
        super().__init__(model_dir, device)
        c, w = self.cfg, self.w
        low = next(iter(w.values())).dtype if device == "cpu" else torch.bfloat16
        self.caches = torch.nn.Module()
        self.attn = []
        for l in range(c["num_layers"]):
            for j in (0, 1):
                name = f"l{l}a{j}"
                self.caches.register_buffer(name + "_lat", torch.zeros(1, max_len, self.lora, device=device, dtype=low))
                self.caches.register_buffer(name + "_rope", torch.zeros(1, max_len, self.rope_dim, device=device, dtype=low))
                self.attn.append(name)
        self.max_len = max_len
        n = c["n_routed_experts"]
        self.experts = []
        for l in range(c["num_layers"]):
            p = f"model.layers.{l}.mlp.experts."
            self.experts.append(tuple(torch.stack([w[f"{p}{e}.{m}_proj.weight"] for e in range(n)]) for m in ("gate", "up", "down")))

    def mla_static(self, p, name, x, pos):  # the whole preallocated cache, masked past pos
        q_nope, q_rope, lat, k_rope = self.mla_inputs(p, x, pos, 1, 1)
        cache_lat, cache_rope = getattr(self.caches, name + "_lat"), getattr(self.caches, name + "_rope")
        cache_lat.index_copy_(1, pos, lat)
        cache_rope.index_copy_(1, pos, k_rope)
        return self.attend(p, q_nope, q_rope, cache_lat, cache_rope, pos)

    def moe_static(self, p, l, x):
        c, w = self.cfg, self.w
        probs = (x.float() @ w[p + "router.classifier.weight"].T).softmax(-1)
        idx = torch.topk(probs + w[p + "router.e_score_correction_bias"], c["moe_topk"], dim=-1).indices[0]  # [k]
        gate = (probs[0, idx] * c["routed_scaling_factor"]).to(x.dtype)
        routed = idx < c["n_routed_experts"]
        e = idx.clamp(max=c["n_routed_experts"] - 1)
        wg, wu, wd = self.experts[l]
        act = torch.nn.functional.silu(torch.einsum("h,kfh->kf", x[0], wg[e])) * torch.einsum("h,kfh->kf", x[0], wu[e])
        y = torch.where(routed[:, None], torch.einsum("kf,khf->kh", act, wd[e]), x)  # zero experts: the input
        return (gate[:, None] * y).sum(0, keepdim=True)

    def step(self, tok, ngram_ids, pos):  # tok [1], ngram_ids [1, E], pos [1]: logits [1, V]
        w, c = self.w, self.cfg
        h = w["model.embed_tokens.weight"][tok]
        if self.ngram:
            for i in range(ngram_ids.shape[1]):
                h = h + w[f"model.ngram_embeddings.embedders.{i}.weight"][ngram_ids[:, i]] @ w[f"model.ngram_embeddings.post_projs.{i}.weight"].T
            h = h / (1 + ngram_ids.shape[1])
        for l in range(c["num_layers"]):
            p = f"model.layers.{l}."
            a = h + self.mla_static(p + "self_attn.0.", self.attn[2 * l], self.rms(h, w[p + "input_layernorm.0.weight"]), pos)
            u = self.rms(a, w[p + "post_attention_layernorm.0.weight"])
            b = a + self.swiglu(p + "mlps.0.", u)
            cc = b + self.mla_static(p + "self_attn.1.", self.attn[2 * l + 1], self.rms(b, w[p + "input_layernorm.1.weight"]), pos)
            h = cc + self.swiglu(p + "mlps.1.", self.rms(cc, w[p + "post_attention_layernorm.1.weight"])) + self.moe_static(p + "mlp.", l, u)
        return self.rms(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


def run_static(model_dir, prompt_len, decode_len, device, compile_step):
    dec = StaticDecoder(model_dir, device, prompt_len + decode_len)
    step = torch.compile(dec.step, mode="reduce-overhead", fullgraph=True) if compile_step else dec.step
    V, E = dec.cfg["vocab_size"], len(dec.tables) if dec.ngram else 0
    prompt = [3 + (i * 7919) % (V - 3) for i in range(prompt_len)]

    def run():
        ctx, out = [], []
        t0 = time.perf_counter()
        for n in range(prompt_len + decode_len - 1):  # the prompt a token per step, then decode
            x = prompt[n] if n < prompt_len else out[-1]
            ids = dec.hash_ids([x], ctx) if E else torch.zeros(1, 0, dtype=torch.long, device=device)
            logits = step(torch.tensor([x], device=device), ids, torch.tensor([n], device=device))
            if n >= prompt_len - 1:
                out.append(int(logits.argmax(-1)))
            if n == prompt_len - 1:
                t1 = time.perf_counter()
        return out, t1 - t0, time.perf_counter() - t1

    run()  # warm-up (and compilation, and the CUDA graph's recording)
    run()
    tokens, prefill_s, decode_s = run()
    print(json.dumps({"batch": 1, "static": True, "prefill_tok_s": round(prompt_len / prefill_s, 2),
                      "decode_tok_s": round((decode_len - 1) / decode_s, 2), "tokens": tokens}))


def main():
    model_dir, prompt_len, decode_len, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
    torch.set_num_threads(threads)
    if "--static" in sys.argv:
        return run_static(model_dir, prompt_len, decode_len, device, "--compile" in sys.argv)
    dec = Decoder(model_dir, device)
    if "--compile" in sys.argv:
        dec.forward = torch.compile(dec.forward, dynamic=True)
    V = dec.cfg["vocab_size"]
    batch = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else 1
    prompts = [[3 + (i * 7919 + b * 104729) % (V - 3) for i in range(prompt_len)] for b in range(batch)]

    def run():
        state = {"n": 0, "ctx": [[] for _ in range(batch)], "cache": {}}
        t0 = time.perf_counter()
        out = [dec.forward(prompts, state).argmax(-1).tolist()]
        t1 = time.perf_counter()
        for _ in range(decode_len - 1):
            out.append(dec.forward([[t] for t in out[-1]], state).argmax(-1).tolist())
        return [step[0] for step in out], t1 - t0, time.perf_counter() - t1

    run()  # warm-up (and compilation)
    if device != "cpu":
        torch.cuda.synchronize()
    tokens, prefill_s, decode_s = run()
    print(json.dumps({"batch": batch, "prefill_tok_s": round(batch * prompt_len / prefill_s, 2),
                      "decode_tok_s": round(batch * (decode_len - 1) / decode_s, 2), "tokens": tokens}))


if __name__ == "__main__":
    main()
