"""The PyTorch baseline for training throughput: the same model (config.json), batch shape and
optimizer as `troupe train`, written the way a PyTorch user would (float32, batched, eager,
masked softmax attention, experts over index_select/index_add, torch.optim.AdamW).

usage: pytorch_train.py CONFIG_JSON SEQUENCES SEQ_LEN STEPS THREADS [DEVICE [PRECISION]]
DEVICE cpu (default) or cuda; PRECISION f32 (default), tf32 (float32 with TF32 tensor-core
matmuls, torch.backends.cuda.matmul.allow_tf32) or bf16 (autocast: bf16 GEMMs, float32
parameters, as mixed-precision training runs).
prints one JSON line: {"tokens_per_s": ..., "first_loss": ..., "last_loss": ...}
"""
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))
import longcat_reference as ref  # noqa: E402  (n-gram hashing, RoPE frequencies, softmax scale)

torch.set_grad_enabled(True)  # the reference module turns autograd off for itself

F = torch.nn.functional


def param(*shape, std):
    return torch.nn.Parameter(torch.randn(*shape) * std)


class Model(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        H, V = c["hidden_size"], c["vocab_size"]
        self.embed = param(V, H, std=1.0)
        self.ngram = "Ngram" in c["architectures"][0]
        if self.ngram:
            E = c["emb_split_num"] * (c["emb_neighbor_num"] - 1)
            d, m = H // E, int(c["ngram_vocab_size_ratio"] * V)
            self.tables = torch.nn.ParameterList([param(m + 2 * i + 1, d, std=1.0) for i in range(E)])
            self.projs = torch.nn.ParameterList([param(H, d, std=d ** -0.5) for _ in range(E)])
        nh, qk, vd = c["num_attention_heads"], c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["v_head_dim"]
        qr, kr, F_, EF = c["q_lora_rank"], c["kv_lora_rank"], c["ffn_hidden_size"], c["expert_ffn_hidden_size"]
        E_all = c["n_routed_experts"] + c.get("zero_expert_num", 0)

        def lin(o, i):
            return param(o, i, std=i ** -0.5)

        def mla():
            return torch.nn.ParameterDict(dict(q_a=lin(qr, H), q_a_norm=torch.nn.Parameter(torch.ones(qr)), q_b=lin(nh * qk, qr),
                                               kv_a=lin(kr + c["qk_rope_head_dim"], H), kv_norm=torch.nn.Parameter(torch.ones(kr)),
                                               kv_b=lin(nh * (c["qk_nope_head_dim"] + vd), kr), o=lin(H, nh * vd)))

        def mlp(f):
            return torch.nn.ParameterDict(dict(gate=lin(f, H), up=lin(f, H), down=lin(H, f)))

        self.blocks = torch.nn.ModuleList()
        for _ in range(c["num_layers"]):
            b = torch.nn.Module()
            b.norms = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(H)) for _ in range(4)])
            b.attn = torch.nn.ModuleList([mla(), mla()])
            b.mlps = torch.nn.ModuleList([mlp(F_), mlp(F_)])
            b.router = lin(E_all, H)
            b.register_buffer("bias", torch.zeros(E_all))
            b.experts = torch.nn.ModuleList([mlp(EF) for _ in range(c["n_routed_experts"])])
            self.blocks.append(b)
        self.norm = torch.nn.Parameter(torch.ones(H))
        self.head = lin(V, H)
        inv_freq, af = ref.rope_inv_freq(c)
        self.register_buffer("inv_freq", inv_freq.to(torch.float32))
        self.af, self.scale = af, ref.softmax_scale(c)

    def rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c["rms_norm_eps"]))

    def mla(self, p, x, cos, sin):
        c = self.c
        B, T, H = x.shape
        nh, nope, rope, vd, kr = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                                  c["v_head_dim"], c["kv_lora_rank"])
        q = self.rms(x @ p["q_a"].T, p["q_a_norm"]) @ p["q_b"].T * math.sqrt(H / c["q_lora_rank"])
        q = q.view(B, T, nh, nope + rope).transpose(1, 2)
        kv = x @ p["kv_a"].T
        k_lat = self.rms(kv[..., :kr], p["kv_norm"]) * math.sqrt(H / kr)
        q_rot = ref.rope_interleave(q[..., nope:], cos, sin)
        k_rot = ref.rope_interleave(kv[..., kr:], cos, sin).unsqueeze(1).expand(B, nh, T, rope)
        kvb = (k_lat @ p["kv_b"].T).view(B, T, nh, nope + vd).transpose(1, 2)
        k = torch.cat([kvb[..., :nope], k_rot], -1)
        qf = torch.cat([q[..., :nope], q_rot], -1)
        scores = (qf @ k.transpose(-1, -2)) * self.scale  # Debian's torch 1.13 has no scaled_dot_product_attention
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1), float("-inf"))
        out = scores.softmax(-1) @ kvb[..., nope:]
        return out.transpose(1, 2).reshape(B, T, nh * vd) @ p["o"].T

    @staticmethod
    def swiglu(p, x):
        return (F.silu(x @ p["gate"].T) * (x @ p["up"].T)) @ p["down"].T

    def moe(self, b, u):
        c = self.c
        shape = u.shape
        x = u.reshape(-1, shape[-1])
        probs = (x @ b.router.T).softmax(-1)
        idx = torch.topk(probs + b.bias, c["moe_topk"], dim=-1).indices
        gate = probs.gather(1, idx) * c["routed_scaling_factor"]
        out = (gate * (idx >= c["n_routed_experts"])).sum(-1, keepdim=True) * x  # zero experts
        for e, expert in enumerate(b.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                out = out.index_add(0, rows, self.swiglu(expert, x[rows]) * gate[rows, slot].unsqueeze(-1))
        return out.view(shape)

    def forward(self, tokens, hid):
        B, T = tokens.shape
        x = self.embed[tokens]
        if self.ngram:
            for i, (t, p) in enumerate(zip(self.tables, self.projs)):
                x = x + t[hid[..., i]] @ p.T
            x = x / (1 + len(self.tables))
        freqs = torch.arange(T, dtype=torch.float32, device=tokens.device)[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos() * self.af, freqs.sin() * self.af
        h = x
        for b in self.blocks:
            a = h + self.mla(b.attn[0], self.rms(h, b.norms[0]), cos, sin)
            u = self.rms(a, b.norms[1])
            shortcut = self.moe(b, u)
            bb = a + self.swiglu(b.mlps[0], u)
            cc = bb + self.mla(b.attn[1], self.rms(bb, b.norms[2]), cos, sin)
            h = cc + self.swiglu(b.mlps[1], self.rms(cc, b.norms[3])) + shortcut
        return self.rms(h, self.norm) @ self.head.T


def main():
    config, sequences, seq_len, steps, threads = sys.argv[1], *map(int, sys.argv[2:6])
    device = sys.argv[6] if len(sys.argv) > 6 else "cpu"
    precision = sys.argv[7] if len(sys.argv) > 7 else "f32"
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.manual_seed(0)
    c = json.load(open(config))
    model = Model(c).to(device)
    # On the GPU the fused AdamW kernels: the strongest optimizer step PyTorch offers.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if device == "cuda" else {}))
    gen = torch.Generator().manual_seed(1)
    batches = []  # made before timing: the n-gram hashing here is Python, Troupe's is C++
    for _ in range(steps + 2):
        windows = torch.randint(3, c["vocab_size"], (sequences, seq_len + 1), generator=gen)
        hid = torch.stack([torch.from_numpy(ref.ngram_ids(c, row.tolist())) for row in windows[:, :-1]]) if model.ngram else None
        batches.append((windows[:, :-1].to(device), windows[:, 1:].to(device), hid.to(device) if hid is not None else None))
    losses, start = [], None
    for step, (tokens, targets, hid) in enumerate(batches):  # two warm-up steps are not timed
        if step == 2:
            start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(tokens, hid)
            loss = F.cross_entropy(logits.reshape(-1, c["vocab_size"]).float(), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": steps * sequences * seq_len / elapsed, "first_loss": losses[0], "last_loss": losses[-1]}))


if __name__ == "__main__":
    main()
