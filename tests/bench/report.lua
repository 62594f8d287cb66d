-- wrk script used by tests/bench/run for every load run.
--
-- Without arguments it sends wrk's static request (no per-request Lua cost).
-- With a file argument (`wrk -s report.lua URL -- cookies.txt`) it cycles
-- through the cookie values in the file, one per line, sending each as
-- `cookie: sa=<value>`; the scale runs use it with 1 and with 100,000 lines.
--
-- done() prints one JSON line, prefixed "WRK_JSON ", with exact percentiles
-- in microseconds, so the harness does not parse wrk's rounded text.

local cookies = nil
local count = 0
local i = 0

function init(args)
  local path = args[1]
  if path == nil then
    return
  end
  cookies = {}
  for line in io.lines(path) do
    if #line > 0 then
      count = count + 1
      cookies[count] = "sa=" .. line
    end
  end
  -- Start each thread at a different place in the list.
  i = math.random(count) - 1
  request = function()
    i = i % count + 1
    wrk.headers["cookie"] = cookies[i]
    return wrk.format()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us": %d, "requests": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "max": %d, "p50": %d, "p90": %d, "p99": %d, "p999": %d}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
