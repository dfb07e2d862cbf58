-- Sliding window log for every descriptor of one rate limit request, in one atomic call.
--
-- KEYS[i]: the counter of descriptor i, a sorted set of admitted hits scored by time (us).
-- ARGV: four per descriptor: limit, window (us), shadow ("1" or "0"), hits.
-- Returns {admitted, then per descriptor: over (0/1), remaining, ms until a slot frees}.
--
-- The request is admitted only if every non-shadow descriptor has room for its hits; only
-- then are hits recorded, so a denied request consumes nothing. A shadow descriptor is
-- counted as if it were enforced on its own (recorded only when it has room), so its
-- would-limit reports are the denials enforcing it would cause.
--
-- Redis's clock, not the callers': every node's RLS decides on one clock.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local counts, over, pending = {}, {}, {}
local admitted = true
for i = 1, n do
  local key, b = KEYS[i], (i - 1) * 4
  local limit, window = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local hits = tonumber(ARGV[b + 4])
  -- Numbers go to Redis as '%d' strings: Lua's default formatting (%.14g) would round
  -- microsecond timestamps.
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now - window))
  -- Two descriptors of one request may share a counter: count what this request would
  -- already add to it.
  local count = redis.call('ZCARD', key) + (pending[key] or 0)
  counts[i] = count
  over[i] = count + hits > limit
  if over[i] then
    if ARGV[b + 3] ~= '1' then admitted = false end
  else
    pending[key] = (pending[key] or 0) + hits
  end
end

local out = {admitted and 1 or 0}
for i = 1, n do
  local key, b = KEYS[i], (i - 1) * 4
  local limit, window = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local hits = tonumber(ARGV[b + 4])
  local count = counts[i]
  if admitted and not over[i] and hits > 0 then
    -- Scores strictly increase per key (members are their scores), so two decisions in
    -- the same microsecond, or hits > 1, never collide.
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    local score = now
    if last[2] ~= nil then score = math.max(now, tonumber(last[2]) + 1) end
    -- In chunks: unpack() has a limit of a few thousand values.
    local left = hits
    while left > 0 do
      local args = {}
      for h = 1, math.min(left, 1000) do
        local s = string.format('%d', score)
        args[2 * h - 1] = s
        args[2 * h] = s
        score = score + 1
      end
      redis.call('ZADD', key, unpack(args))
      left = left - #args / 2
    end
    -- Until the newest entry leaves the window (scores may run ahead of now by a few us).
    redis.call('PEXPIRE', key, math.floor((score - now + window) / 1000) + 1)
    count = count + hits
  end
  local reset
  if over[i] and hits > limit then
    reset = window / 1000  -- never fits: the whole window
  else
    -- Over: room for the hits once the oldest (count + hits - limit) entries have left.
    -- Within: the next time the count drops.
    local rank = 0
    if over[i] then rank = count + hits - limit - 1 end
    local at = redis.call('ZRANGE', key, rank, rank, 'WITHSCORES')
    if at[2] ~= nil then
      reset = (tonumber(at[2]) + window - now) / 1000
    elseif over[i] then
      reset = window / 1000  -- what blocks it is this request's own hits on a shared key
    else
      reset = 0
    end
  end
  local remaining = limit - count
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = over[i] and 1 or 0
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(reset)
end
return out
