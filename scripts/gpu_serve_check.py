#!/usr/bin/env python3
"""Serving on the GPU, checked on the GPU machine (gpu-bundle/check.sh runs it).

Starts `troupe serve` three times on loopback (port 0, read from the log): the CPU graph, the
CUDA graph, and the CUDA graph with the demo draft (k = 3). Sends the same 16 concurrent greedy
completions to each and compares texts. Every request must complete on every server; texts are
compared token-for-token only as a report, since bf16 GPU logits may flip a near-tie.
Usage: gpu_serve_check.py BUNDLE_DIR MODEL_DIR DRAFT_DIR
"""
import json, re, subprocess, sys, threading, time, urllib.request

bundle, model, draft = sys.argv[1:4]


def start(*extra):
    log = open(f"/tmp/serve-{len(extra)}-{time.time_ns()}.log", "w+")
    proc = subprocess.Popen([f"{bundle}/run", "troupe", "serve", "--model", model, "--port", "0", *extra],
                            stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        log.seek(0)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            log.seek(0)
            sys.exit("serve exited:\n" + log.read())
        time.sleep(0.1)
    sys.exit("serve did not start")


def complete(port, prompt):
    body = json.dumps({"prompt": prompt, "max_tokens": 48, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=300))["choices"][0]["text"]


prompts = [f"And the LORD spake unto Moses, saying {i}" if i % 2 else f"In the beginning {i}" for i in range(16)]
results = {}
for name, extra in [("cpu", ()), ("cuda", ("--device", "cuda")),
                    ("cuda+draft", ("--device", "cuda", "--draft", draft, "--draft-tokens", "3"))]:
    proc, port = start(*extra)
    texts = [None] * len(prompts)

    def run(i):
        try:
            texts[i] = complete(port, prompts[i])
        except Exception as e:  # reported below as a failure
            texts[i] = e

    t0 = time.time()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads: t.start()
    for t in threads: t.join()
    seconds = time.time() - t0
    proc.terminate()
    proc.wait(timeout=60)
    failed = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t]
    print(f"{name}: {len(prompts) - len(failed)}/{len(prompts)} completed in {seconds:.1f} s"
          + (f"; failed: {[texts[i] for i in failed]}" if failed else ""))
    if failed:
        sys.exit(1)
    results[name] = texts

for other in ("cuda", "cuda+draft"):
    same = sum(a == b for a, b in zip(results["cpu"] if other == "cuda" else results["cuda"], results[other]))
    base = "cpu" if other == "cuda" else "cuda"
    print(f"{other} vs {base}: {same}/{len(prompts)} texts identical")
