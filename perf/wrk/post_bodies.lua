-- wrk script (perf/fair.py): POST pre-built request bodies in turn, then print the figures as one JSON line.
--   wrk -s post_bodies.lua <url> -- <dir> <count> <path>
-- <dir>/NNNNN.bin is a body; <dir>/NNNNN.hdr, when present, the value of Inference-Header-Content-Length
-- (a KServe v2 binary-tensor request: JSON header, then the raw bytes).
local bodies, header_lengths, path, i = {}, {}, "/", 0

function init(args)
  local dir, count = args[1], tonumber(args[2])
  path = args[3]
  for k = 1, count do
    local f = assert(io.open(string.format("%s/%05d.bin", dir, k - 1), "rb"))
    bodies[k] = f:read("*a")
    f:close()
    local h = io.open(string.format("%s/%05d.hdr", dir, k - 1), "r")
    if h then
      header_lengths[k] = h:read("*l")
      h:close()
    end
  end
end

function request()
  i = i % #bodies + 1
  local headers = { ["Content-Type"] = "application/octet-stream" }
  if header_lengths[i] then
    headers["Inference-Header-Content-Length"] = header_lengths[i]
  end
  return wrk.format("POST", path, headers, bodies[i])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
