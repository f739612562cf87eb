// Load generator for bench/serve.py: autocannon (Node) posting PNG files as raw bodies, cycling through them, with
// every response's latency kept for exact percentiles.
//   node serve_load.js URL CONNECTIONS SECONDS FILE...   -> one JSON line
"use strict";
const fs = require("fs");
const autocannon = require("autocannon");

const [url, connections, seconds, ...files] = process.argv.slice(2);
const bodies = files.map((f) => fs.readFileSync(f));
const latencies = [];
let next = 0;
let bad = 0;
const instance = autocannon({
  url,
  method: "POST",
  connections: Number(connections),
  duration: Number(seconds),
  headers: { "content-type": "image/png" },
  requests: [{
    setupRequest: (request) => {
      request.body = bodies[next++ % bodies.length];
      return request;
    },
  }],
}, (err, result) => {
  if (err) { console.error(err); process.exit(1); }
  latencies.sort((a, b) => a - b);
  const at = (q) => latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] : NaN;
  console.log(JSON.stringify({
    requests: latencies.length, seconds: result.duration, ok: result["2xx"], non2xx: result.non2xx,
    errors: result.errors + result.timeouts, bad_status: bad, p50_ms: at(0.5), p95_ms: at(0.95), p99_ms: at(0.99),
    mean_ms: latencies.reduce((a, b) => a + b, 0) / Math.max(1, latencies.length),
  }));
});
instance.on("response", (client, statusCode, resBytes, responseTime) => {
  latencies.push(responseTime);
  if (statusCode !== 200) bad += 1;
});
