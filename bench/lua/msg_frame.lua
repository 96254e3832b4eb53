-- wrk script for bench/msg_throughput.py: POST Mattermost /msg frames, each with its own id.
--
-- Usage:
--   wrk -t1 -c32 -d15s -s bench/lua/msg_frame.lua URL -- REMOTE_ID TOKEN PREFIX
--
-- Every request carries a frame
--   {"remote_id":REMOTE_ID,"msg":{"id":ID,"topic":"bench","create_at":1,"payload":{...}}}
-- (a payload of about 200 bytes) with the headers Content-Type: application/json,
-- X-RemoteCluster-Id: REMOTE_ID and X-RemoteCluster-Token: TOKEN. ID is 26 characters:
-- PREFIX (4 letters or digits, one per run so that runs never repeat an id), the wrk thread's
-- number (2 digits) and a per-thread counter (20 digits). A repeated id would be answered from
-- the daemon's inbox without being forwarded, so every id is new.
--
-- Answers are checked: a status outside 200-299 counts as non2xx, a 2xx whose body lacks
-- "status":"OK" counts as not_ok. done() prints one line "MSGBENCH {json}" with the totals and
-- the latency percentiles in microseconds.

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local remote_id, prefix, payload
local counter = 0

function init(args)
  remote_id = args[1]
  local token = args[2]
  prefix = args[3]
  if remote_id == nil or token == nil or prefix == nil or #prefix ~= 4 then
    error("usage: wrk ... -s msg_frame.lua URL -- REMOTE_ID TOKEN PREFIX(4 characters)")
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["X-RemoteCluster-Id"] = remote_id
  wrk.headers["X-RemoteCluster-Token"] = token
  payload = '{"channel_id":"benchchannelbenchchannel01","user_id":"benchuserbenchuserbenchus1",'
    .. '"text":"' .. string.rep("x", 120) .. '"}'
  non2xx = 0
  not_ok = 0
end

function request()
  counter = counter + 1
  local id = string.format("%s%02d%020d", prefix, tid, counter)
  local body = '{"remote_id":"' .. remote_id .. '","msg":{"id":"' .. id
    .. '","topic":"bench","create_at":1,"payload":' .. payload .. '}}'
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  elseif not string.find(body, '"status":"OK"', 1, true) then
    not_ok = not_ok + 1
  end
end

function done(summary, latency, requests)
  local bad, failed = 0, 0
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("non2xx")
    failed = failed + thread:get("not_ok")
  end
  local e = summary.errors
  io.write(string.format(
    'MSGBENCH {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"non2xx":%.0f,"not_ok":%.0f,'
      .. '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},'
      .. '"latency_us":{"mean":%.1f,"p50":%.0f,"p90":%.0f,"p99":%.0f,"max":%.0f}}\n',
    summary.requests, summary.duration, summary.bytes, bad, failed,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max
  ))
end
