"""The memory-defaults sweep of docs/MODELS.md ("The sweep behind the defaults"): one MQAR training run with the
trainer's recipe (AdamW, warmup + cosine, grad clip 1, skipped non-finite steps), printing validation accuracy and
every memory layer's health statistics every --every steps, and a line per skipped step.

    PYTHONPATH=src python benchmarks/memory_sweep.py --variant lmm --max-lr 0.2 --chunk 4 --steps 1500 --total 6000 \
        --set value_norm=true --out lmm.json

--set KEY=JSON sets a memory.* field (e.g. --set normalize_step=false --set max_chunk_lr=null), --model KEY=JSON a
model field (e.g. --model mal_memory_residual=false: MAL's form before); --gate-bias sets
MAG's mixing-gate bias; --zero-last zero-initialises the memory's last layer. One thread.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from mnemos.data import MQARConfig, IGNORE_INDEX
from mnemos.models import MnemosConfig, MnemosLM
from mnemos.layers import NeuralMemory
from mnemos.train.optim import build_optimizer, build_scheduler

p = argparse.ArgumentParser()
p.add_argument("--variant", default="lmm"); p.add_argument("--depth", type=int, default=2)
p.add_argument("--max-lr", type=float, default=0.01); p.add_argument("--chunk", type=int, default=16)
p.add_argument("--lr", type=float, default=3e-3); p.add_argument("--steps", type=int, default=1500)
p.add_argument("--total", type=int, default=6000); p.add_argument("--seed", type=int, default=0)
p.add_argument("--L", type=int, default=64); p.add_argument("--K", type=int, default=8); p.add_argument("--V", type=int, default=64)
p.add_argument("--every", type=int, default=100); p.add_argument("--set", action="append", default=[])
p.add_argument("--model", action="append", default=[])
p.add_argument("--zero-last", action="store_true"); p.add_argument("--gate-bias", type=float, default=None); p.add_argument("--out", default=None)
p.add_argument("--segment", type=int, default=32)
a = p.parse_args()
torch.set_num_threads(1); torch.manual_seed(a.seed)
mem = dict(depth=a.depth, max_lr=a.max_lr, chunk_size=a.chunk)
for s in a.set:
    k, v = s.split("="); mem[k] = json.loads(v)
extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.model)}
cfg = MnemosConfig(variant=a.variant, vocab_size=a.V, d_model=64, n_layers=2, n_heads=4, window=8, segment_len=a.segment,
                   num_persistent=4, memory=mem, **extra)
model = MnemosLM(cfg)
tr = MQARConfig(vocab_size=a.V, seq_len=a.L, num_kv_pairs=a.K, num_examples=20000, noise="disjoint").build(a.seed)
va = MQARConfig(vocab_size=a.V, seq_len=a.L, num_kv_pairs=a.K, num_examples=512, noise="disjoint").build(a.seed + 1000003)
opt = build_optimizer(model, lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
sch = build_scheduler(opt, warmup=100, total=a.total, min_ratio=0.1)
mems = [m for m in model.modules() if isinstance(m, NeuralMemory)]
if a.gate_bias is not None:
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "MemoryAsGate": m.gate.bias.fill_(a.gate_bias)
if a.zero_last:
    with torch.no_grad():
        for m in mems: m.memory[-1].zero_()
def ev():
    model.eval(); c = n = 0
    with torch.no_grad():
        for i in range(0, 512, 128):
            x, y = va[0][i:i+128], va[1][i:i+128]
            pr = model(x)[0].argmax(-1); m = y != IGNORE_INDEX
            c += int((pr[m] == y[m]).sum()); n += int(m.sum())
    model.train(); return c / n
t0 = time.time(); skipped = 0; hist = []
for step in range(a.steps):
    g = torch.Generator().manual_seed(a.seed * 1000003 + step)
    idx = torch.randint(0, 20000, (32,), generator=g)
    x, y = tr[0][idx], tr[1][idx]
    rec = (step + 1) % a.every == 0 or step == 0
    for m in mems: m.record_stats = rec
    logits, _ = model(x)
    loss = F.cross_entropy(logits.reshape(-1, a.V), y.reshape(-1), ignore_index=IGNORE_INDEX)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if torch.isfinite(gn): opt.step()
    else:
        skipped += 1
        opt.zero_grad(set_to_none=True)
        for m in mems: m.record_stats = True
        with torch.no_grad():
            model(x)
        print(f"SKIP at step {step+1}: " + " | ".join(" ".join(f"{k_} {v_:.3g}" for k_, v_ in m.last_stats.items()) for m in mems), flush=True)
    sch.step(); opt.zero_grad(set_to_none=True)
    if rec:
        acc = ev()
        st = [m.last_stats for m in mems]
        line = (f"step {step+1} loss {loss.item():.3f} acc {acc:.3f} skip {skipped} gn {gn.item():.2f} "
                f"{(step+1)*2048/(time.time()-t0):.0f} tok/s | " + " | ".join(
                f"th {s['theta_mean']:.4f}/{s['theta_max']:.4f} eta {s['eta_mean']:.2f}/{s['eta_max']:.2f} "
                f"stp {s['step_max']:.4f} il {s['inner_loss_start']:.2f}->{s['inner_loss']:.2f} "
                f"wn {s['memory_norm']:.1f} wf {s['write_fraction']:.2f} cv {s.get('curvature_max', 0):.2f}" for s in st))
        print(line, flush=True)
        hist.append({"step": step + 1, "loss": loss.item(), "acc": acc, "skipped": skipped, "stats": st})
        if skipped > 20: print("DIVERGED"); break
if a.out: json.dump({"args": vars(a), "hist": hist}, open(a.out, "w"))
