#!/usr/bin/env python3
"""Independent PyTorch reference for LongCat-Flash(-Lite) (spec: model.md), in float64.

It reads a Troupe/Hugging Face model directory (config.json + safetensors, sharded or not)
without Troupe's code, computes the logits of a token sequence the way transformers'
LongcatFlashForCausalLM does (full K/V expanded from the latent, de-interleaving RoPE, dense
causal softmax) plus the n-gram embedding computed from its defining formula
(sum_k x_{t-k} V^k) mod M_i, and compares against Troupe's outputs:

    longcat_reference.py --model DIR --ids IDS.json --logits OUT.npy --ngram-ids NG.npy --tol 1e-4

Exit status 0 when the n-gram ids match exactly and the logits are within --tol (relative L2).
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch

torch.set_grad_enabled(False)
F64 = torch.float64


def load_safetensors(path):
    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        raw = data[b:end]
        if e["dtype"] == "BF16":
            u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = u.view(np.float32)
        elif e["dtype"] == "F16":
            arr = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
        elif e["dtype"] == "F32":
            arr = np.frombuffer(raw, dtype=np.float32)
        else:
            raise SystemExit(f"{path}: unexpected dtype {e['dtype']} for {name}")
        out[name] = torch.from_numpy(arr.reshape(e["shape"]).copy()).to(F64)
    return out


def load_weights(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    w = {}
    for f in files:
        w.update(load_safetensors(os.path.join(model_dir, f)))
    return w


def ngram_ids(cfg, ids):
    """Hash ids [T, E] straight from the definition, with Python's unbounded integers."""
    V, N, K = cfg["vocab_size"], cfg["emb_neighbor_num"], cfg["emb_split_num"]
    sizes = cfg.get("ngram_table_sizes")
    m = int(math.floor(cfg["ngram_vocab_size_ratio"] * V))
    eos = cfg["eos_token_id"]
    out = np.zeros((len(ids), K * (N - 1)), dtype=np.int64)
    seg_start = 0
    for t, x in enumerate(ids):
        for n in range(2, N + 1):
            full = sum(ids[t - k] * V**k for k in range(n) if t - k >= seg_start)
            for j in range(K):
                i = (n - 2) * K + j
                M = sizes[i] if sizes else m + 2 * i + 1
                out[t, i] = full % M
        if x == eos:
            seg_start = t + 1
    return out


def rope_inv_freq(cfg):
    """As transformers computes it (float32), then promoted; returns (inv_freq, attention_factor)."""
    dim = cfg["qk_rope_head_dim"]
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    base = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    rtype = rp.get("rope_type", rp.get("type", "default")) if rp else "default"
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rtype == "default":
        return (1.0 / pos_freqs).to(F64), 1.0
    factor = rp["factor"]
    omax = rp["original_max_position_embeddings"]

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    af = rp.get("attention_factor")
    if af is None:
        if rp.get("mscale") and rp.get("mscale_all_dim"):
            af = get_mscale(factor, rp["mscale"]) / get_mscale(factor, rp["mscale_all_dim"])
        else:
            af = get_mscale(factor)
    beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(omax / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv.to(F64), af


def softmax_scale(cfg):
    s = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rp and rp.get("rope_type", rp.get("type")) == "yarn" and rp.get("mscale_all_dim"):
        m = 0.1 * rp["mscale_all_dim"] * math.log(rp["factor"]) + 1.0 if rp["factor"] > 1 else 1.0
        s = s * m * m
    return s


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_interleave(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def mla(cfg, w, p, x, cos, sin):
    T, H = x.shape
    nh, nope, rope, vd = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    lora, eps = cfg["kv_lora_rank"], cfg["rms_norm_eps"]
    if cfg.get("q_lora_rank"):
        q = rms(x @ w[p + "q_a_proj.weight"].T, w[p + "q_a_layernorm.weight"], eps) @ w[p + "q_b_proj.weight"].T
        if cfg.get("mla_scale_q_lora", True):
            q = q * math.sqrt(H / cfg["q_lora_rank"])
    else:
        q = x @ w[p + "q_proj.weight"].T
    q = q.view(T, nh, nope + rope).transpose(0, 1)  # [nh, T, qk]
    q_pass, q_rot = q[..., :nope], q[..., nope:]
    kv = x @ w[p + "kv_a_proj_with_mqa.weight"].T
    k_pass = rms(kv[:, :lora], w[p + "kv_a_layernorm.weight"], eps)
    if cfg.get("mla_scale_kv_lora", True):
        k_pass = k_pass * math.sqrt(H / lora)
    k_rot = kv[:, lora:]
    q_rot = rope_interleave(q_rot, cos, sin)
    k_rot = rope_interleave(k_rot, cos, sin)
    kvb = (k_pass @ w[p + "kv_b_proj.weight"].T).view(T, nh, nope + vd).transpose(0, 1)
    k_nope, v = kvb[..., :nope], kvb[..., nope:]
    k = torch.cat([k_nope, k_rot.unsqueeze(0).expand(nh, T, rope)], dim=-1)
    qf = torch.cat([q_pass, q_rot], dim=-1)
    scores = qf @ k.transpose(1, 2) * softmax_scale(cfg)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    scores = scores.masked_fill(mask, float("-inf")).softmax(-1)
    out = (scores @ v).transpose(0, 1).reshape(T, nh * vd)
    return out @ w[p + "o_proj.weight"].T


def swiglu(w, p, x):
    g = x @ w[p + "gate_proj.weight"].T
    u = x @ w[p + "up_proj.weight"].T
    return (torch.nn.functional.silu(g) * u) @ w[p + "down_proj.weight"].T


def moe(cfg, w, p, x):
    n_routed, k = cfg["n_routed_experts"], cfg["moe_topk"]
    probs = (x @ w[p + "router.classifier.weight"].T).softmax(-1)
    idx = torch.topk(probs + w[p + "router.e_score_correction_bias"], k, dim=-1).indices
    gate = probs.gather(1, idx) * cfg["routed_scaling_factor"]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(k):
            e = int(idx[t, j])
            y = swiglu(w, f"{p}experts.{e}.", x[t : t + 1])[0] if e < n_routed else x[t]
            out[t] += gate[t, j] * y
    return out


def forward(cfg, w, ids):
    eps = cfg["rms_norm_eps"]
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    if "Ngram" in cfg["architectures"][0]:
        hid = ngram_ids(cfg, ids)
        E = hid.shape[1]
        for i in range(E):
            rows = w[f"model.ngram_embeddings.embedders.{i}.weight"][torch.from_numpy(hid[:, i])]
            x = x + rows @ w[f"model.ngram_embeddings.post_projs.{i}.weight"].T
        x = x / (1 + E)
    else:
        hid = np.zeros((len(ids), 0), dtype=np.int64)
    inv_freq, af = rope_inv_freq(cfg)
    pos = torch.arange(len(ids), dtype=torch.float32)
    freqs = (pos[:, None] * inv_freq.to(torch.float32)[None, :]).to(F64)
    cos, sin = freqs.cos() * af, freqs.sin() * af
    h = x
    for l in range(cfg["num_layers"]):
        p = f"model.layers.{l}."
        a = h + mla(cfg, w, p + "self_attn.0.", rms(h, w[p + "input_layernorm.0.weight"], eps), cos, sin)
        u = rms(a, w[p + "post_attention_layernorm.0.weight"], eps)
        shortcut = moe(cfg, w, p + "mlp.", u)
        b = a + swiglu(w, p + "mlps.0.", u)
        c = b + mla(cfg, w, p + "self_attn.1.", rms(b, w[p + "input_layernorm.1.weight"], eps), cos, sin)
        v = rms(c, w[p + "post_attention_layernorm.1.weight"], eps)
        h = (c + swiglu(w, p + "mlps.1.", v)) + shortcut
    h = rms(h, w["model.norm.weight"], eps)
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    return (h @ head.T).numpy(), hid


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="JSON array of token ids")
    ap.add_argument("--logits", nargs="+", required=True, help="Troupe's logits .npy file(s) to check")
    ap.add_argument("--ngram-ids", help="Troupe's n-gram ids .npy to check exactly")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest relative L2 error of the logits")
    ap.add_argument("--greedy-out", help="write the reference's greedy argmax per position (JSON)")
    args = ap.parse_args()
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    ids = json.load(open(args.ids))
    ref, hid = forward(cfg, load_weights(args.model), ids)
    ok = True
    if args.ngram_ids:
        got = np.load(args.ngram_ids)
        same = got.shape == hid.shape and np.array_equal(got, hid)
        print(f"  n-gram ids {hid.shape}: {'identical' if same else 'DIFFER'}")
        ok &= same
    for path in args.logits:
        got = np.load(path).astype(np.float64)
        if got.shape != ref.shape:
            print(f"  {path}: shape {got.shape}, reference {ref.shape}")
            ok = False
            continue
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        # Argmax must agree wherever the reference's top two are not a near-tie.
        top2 = np.sort(ref, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 1e-3 * ref.std()
        agree = float(np.mean((got.argmax(-1) == ref.argmax(-1))[clear])) if clear.any() else 1.0
        print(f"  {os.path.basename(path)}: relative L2 {err:.2e} (tol {args.tol:.0e}), argmax agreement {agree:.3f}")
        ok &= bool(err < args.tol) and agree == 1.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
