-- wrk script of `cargo bench --bench load`: every request carries the next key of the file
-- named by KEYS_FILE (one secret per line, all of one length), round robin, so every key is
-- in use. KEYS_START says where to begin, so consecutive runs go on where the last one stopped.
-- At the end, one line the bench parses:
--   RESULT <requests> <duration µs> <p50 µs> <p99 µs> <non-2xx/3xx> <socket errors>
--
-- The keys are kept outside Lua's heap (LuaJIT's FFI), each copied out as it is sent. With a
-- million keys in Lua, as a table of strings (how this script kept them before) or as one
-- string, wrk stopped for 10-50 ms at a time: LuaJIT marks a table in one step, and a large
-- heap lets a pass of its collector wait for hundreds of thousands of dead strings, whose
-- table it then rehashes in one step. Against the bare upstream, p99.9 was 2-5 ms with 1,000
-- keys and 31-50 ms with 1,000,000, which the bench then charged to the target.

local ffi = require("ffi")
ffi.cdef("void *malloc(size_t size);")

local file = assert(io.open(os.getenv("KEYS_FILE"), "rb"))
local size = file:seek("end")
file:seek("set", 0)
local keys = ffi.cast("char *", ffi.C.malloc(size)) -- never freed: wrk exits after the run
local loaded = 0
while true do
  local chunk = file:read(1048576)
  if not chunk then break end
  ffi.copy(keys + loaded, chunk, #chunk)
  loaded = loaded + #chunk
end
file:close()
assert(loaded == size, "KEYS_FILE: read short")

local width = 0 -- a key and its newline
while width < size and keys[width] ~= 10 do width = width + 1 end
width = width + 1
local count = math.floor(size / width)
assert(count > 0 and count * width == size, "KEYS_FILE: keys are not all of one length")
for line = 1, count do
  assert(keys[line * width - 1] == 10, "KEYS_FILE: keys are not all of one length")
end
collectgarbage()

local headers = {}
local i = tonumber(os.getenv("KEYS_START") or "0") % count

request = function()
  i = i % count + 1
  headers["X-API-Key"] = ffi.string(keys + (i - 1) * width, width - 1)
  return wrk.format("GET", "/bench", headers)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
