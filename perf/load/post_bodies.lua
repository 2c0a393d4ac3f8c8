-- wrk script (perf/load/wrk.py): POST pre-built request bodies in turn, then print the figures as one JSON line.
--   wrk -s post_bodies.lua <url> -- <dir> <count> <path>
-- <dir>/NNNNN.bin is a body; <dir>/NNNNN.hdr its request headers, one "Name: value" per line (the
-- Content-Type, and for a KServe v2 binary-tensor request its Inference-Header-Content-Length).
local bodies, headers, path, i = {}, {}, "/", 0

function init(args)
  local dir, count = args[1], tonumber(args[2])
  path = args[3]
  for k = 1, count do
    local f = assert(io.open(string.format("%s/%05d.bin", dir, k - 1), "rb"))
    bodies[k] = f:read("*a")
    f:close()
    headers[k] = {}
    local h = assert(io.open(string.format("%s/%05d.hdr", dir, k - 1), "r"))
    for line in h:lines() do
      local name, value = line:match("^([^:]+):%s*(.*)$")
      if name then headers[k][name] = value end
    end
    h:close()
  end
end

function request()
  i = i % #bodies + 1
  return wrk.format("POST", path, headers[i], bodies[i])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
