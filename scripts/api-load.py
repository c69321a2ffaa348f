"""Load figures for a running Tessera API: N concurrent streaming chat completions of
TOKENS tokens each; prints one JSON line (whole responses, wall time, tokens/s, time to
first token). Standard library only.
    python3 scripts/api-load.py HOST PORT API_KEY N TOKENS
"""
import http.client, json, sys, threading, time
host, port, key, n, toks = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
res = [None]*n
def one(i):
    c = http.client.HTTPConnection(host, port, timeout=300)
    body = json.dumps({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
        "max_tokens": toks, "temperature": 0.8, "seed": i, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.time()
    c.request("POST", "/v1/chat/completions", body, {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    r = c.getresponse(); first = None; usage = None; done = False
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data: "): continue
        d = line[6:]
        if d == "[DONE]": done = True; break
        j = json.loads(d)
        if first is None and j.get("choices") and j["choices"][0].get("delta", {}).get("content"): first = time.time() - t0
        if j.get("usage"): usage = j["usage"]
    res[i] = (done, first, time.time() - t0, usage["completion_tokens"] if usage else 0)
t0 = time.time()
th = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in th]; [t.join() for t in th]
wall = time.time() - t0
ok = sum(1 for r in res if r and r[0]); toks_total = sum(r[3] for r in res if r)
ttft = sorted(r[1] for r in res if r and r[1] is not None)
print(json.dumps({"requests": n, "whole": ok, "wall_s": round(wall, 2), "completion_tokens": toks_total, "tokens_per_s": round(toks_total / wall, 1),
  "ttft_p50_s": round(ttft[len(ttft)//2], 3), "ttft_max_s": round(ttft[-1], 3)}))
