-- wrk script of `cargo bench --bench load`: every request carries the next key of the file
-- named by KEYS_FILE (one secret per line), round robin, so every key is in use. KEYS_START
-- says where to begin, so consecutive runs go on where the last one stopped.
-- At the end, one line the bench parses:
--   RESULT <requests> <duration µs> <p50 µs> <p99 µs> <non-2xx/3xx> <socket errors>

local keys = {}
for line in io.lines(os.getenv("KEYS_FILE")) do
  keys[#keys + 1] = line
end
local headers = {}
local i = tonumber(os.getenv("KEYS_START") or "0") % #keys

request = function()
  i = i % #keys + 1
  headers["X-API-Key"] = keys[i]
  return wrk.format("GET", "/bench", headers)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
