-- lib.lua: helpers prepended to every script (see listener/scripts.py).
-- Times are Unix milliseconds from the Redis clock, so every daemon and
-- producer agrees on "now" whatever their own clocks say.

-- now in ms, and the microseconds past that ms (for callers that time sleeps)
local function now_ms()
  local t = redis.call('TIME')
  local micros = tonumber(t[2])
  return tonumber(t[1]) * 1000 + math.floor(micros / 1000), micros % 1000
end

-- Pending orders (status `created`, never changed since `create`) have no
-- hash of their own: the record is the field <id> of a bucket hash of the
-- part, `<prefix>:{P}:p:<B>`, with the value "<created entry id>|<deadline ms>"
-- (hundreds of small listpack hashes per part instead of a key per order:
-- about 90 bytes less per pending order). B = (crc32(id) >> 4) % BUCKETS, the
-- bits of zlib's CRC-32 above those of the part (P = crc32(id) % 16).
local BUCKETS = 256  -- a power of two; listener/keys.py has the same
local crc_table  -- zlib's CRC-32 table, built on the first crc32() of a script run

-- zlib's CRC-32 of an order id, as an unsigned number.
-- Plain arithmetic on unsigned values where it can (each bit.* call costs).
local function crc32(id)
  if not crc_table then
    crc_table = {
      0x00000000, 0x77073096, 0xee0e612c, 0x990951ba, 0x076dc419, 0x706af48f, 0xe963a535, 0x9e6495a3,
      0x0edb8832, 0x79dcb8a4, 0xe0d5e91e, 0x97d2d988, 0x09b64c2b, 0x7eb17cbd, 0xe7b82d07, 0x90bf1d91,
      0x1db71064, 0x6ab020f2, 0xf3b97148, 0x84be41de, 0x1adad47d, 0x6ddde4eb, 0xf4d4b551, 0x83d385c7,
      0x136c9856, 0x646ba8c0, 0xfd62f97a, 0x8a65c9ec, 0x14015c4f, 0x63066cd9, 0xfa0f3d63, 0x8d080df5,
      0x3b6e20c8, 0x4c69105e, 0xd56041e4, 0xa2677172, 0x3c03e4d1, 0x4b04d447, 0xd20d85fd, 0xa50ab56b,
      0x35b5a8fa, 0x42b2986c, 0xdbbbc9d6, 0xacbcf940, 0x32d86ce3, 0x45df5c75, 0xdcd60dcf, 0xabd13d59,
      0x26d930ac, 0x51de003a, 0xc8d75180, 0xbfd06116, 0x21b4f4b5, 0x56b3c423, 0xcfba9599, 0xb8bda50f,
      0x2802b89e, 0x5f058808, 0xc60cd9b2, 0xb10be924, 0x2f6f7c87, 0x58684c11, 0xc1611dab, 0xb6662d3d,
      0x76dc4190, 0x01db7106, 0x98d220bc, 0xefd5102a, 0x71b18589, 0x06b6b51f, 0x9fbfe4a5, 0xe8b8d433,
      0x7807c9a2, 0x0f00f934, 0x9609a88e, 0xe10e9818, 0x7f6a0dbb, 0x086d3d2d, 0x91646c97, 0xe6635c01,
      0x6b6b51f4, 0x1c6c6162, 0x856530d8, 0xf262004e, 0x6c0695ed, 0x1b01a57b, 0x8208f4c1, 0xf50fc457,
      0x65b0d9c6, 0x12b7e950, 0x8bbeb8ea, 0xfcb9887c, 0x62dd1ddf, 0x15da2d49, 0x8cd37cf3, 0xfbd44c65,
      0x4db26158, 0x3ab551ce, 0xa3bc0074, 0xd4bb30e2, 0x4adfa541, 0x3dd895d7, 0xa4d1c46d, 0xd3d6f4fb,
      0x4369e96a, 0x346ed9fc, 0xad678846, 0xda60b8d0, 0x44042d73, 0x33031de5, 0xaa0a4c5f, 0xdd0d7cc9,
      0x5005713c, 0x270241aa, 0xbe0b1010, 0xc90c2086, 0x5768b525, 0x206f85b3, 0xb966d409, 0xce61e49f,
      0x5edef90e, 0x29d9c998, 0xb0d09822, 0xc7d7a8b4, 0x59b33d17, 0x2eb40d81, 0xb7bd5c3b, 0xc0ba6cad,
      0xedb88320, 0x9abfb3b6, 0x03b6e20c, 0x74b1d29a, 0xead54739, 0x9dd277af, 0x04db2615, 0x73dc1683,
      0xe3630b12, 0x94643b84, 0x0d6d6a3e, 0x7a6a5aa8, 0xe40ecf0b, 0x9309ff9d, 0x0a00ae27, 0x7d079eb1,
      0xf00f9344, 0x8708a3d2, 0x1e01f268, 0x6906c2fe, 0xf762575d, 0x806567cb, 0x196c3671, 0x6e6b06e7,
      0xfed41b76, 0x89d32be0, 0x10da7a5a, 0x67dd4acc, 0xf9b9df6f, 0x8ebeeff9, 0x17b7be43, 0x60b08ed5,
      0xd6d6a3e8, 0xa1d1937e, 0x38d8c2c4, 0x4fdff252, 0xd1bb67f1, 0xa6bc5767, 0x3fb506dd, 0x48b2364b,
      0xd80d2bda, 0xaf0a1b4c, 0x36034af6, 0x41047a60, 0xdf60efc3, 0xa867df55, 0x316e8eef, 0x4669be79,
      0xcb61b38c, 0xbc66831a, 0x256fd2a0, 0x5268e236, 0xcc0c7795, 0xbb0b4703, 0x220216b9, 0x5505262f,
      0xc5ba3bbe, 0xb2bd0b28, 0x2bb45a92, 0x5cb36a04, 0xc2d7ffa7, 0xb5d0cf31, 0x2cd99e8b, 0x5bdeae1d,
      0x9b64c2b0, 0xec63f226, 0x756aa39c, 0x026d930a, 0x9c0906a9, 0xeb0e363f, 0x72076785, 0x05005713,
      0x95bf4a82, 0xe2b87a14, 0x7bb12bae, 0x0cb61b38, 0x92d28e9b, 0xe5d5be0d, 0x7cdcefb7, 0x0bdbdf21,
      0x86d3d2d4, 0xf1d4e242, 0x68ddb3f8, 0x1fda836e, 0x81be16cd, 0xf6b9265b, 0x6fb077e1, 0x18b74777,
      0x88085ae6, 0xff0f6a70, 0x66063bca, 0x11010b5c, 0x8f659eff, 0xf862ae69, 0x616bffd3, 0x166ccf45,
      0xa00ae278, 0xd70dd2ee, 0x4e048354, 0x3903b3c2, 0xa7672661, 0xd06016f7, 0x4969474d, 0x3e6e77db,
      0xaed16a4a, 0xd9d65adc, 0x40df0b66, 0x37d83bf0, 0xa9bcae53, 0xdebb9ec5, 0x47b2cf7f, 0x30b5ffe9,
      0xbdbdf21c, 0xcabac28a, 0x53b39330, 0x24b4a3a6, 0xbad03605, 0xcdd70693, 0x54de5729, 0x23d967bf,
      0xb3667a2e, 0xc4614ab8, 0x5d681b02, 0x2a6f2b94, 0xb40bbe37, 0xc30c8ea1, 0x5a05df1b, 0x2d02ef8d,
    }
  end
  local crc_of, bxor = crc_table, bit.bxor
  local crc = 4294967295
  local bytes = {string.byte(id, 1, -1)}
  for i = 1, #bytes do
    -- (crc >> 8) xor table[(crc xor byte) & 255]; bit.bxor returns a signed int32
    crc = bxor((crc - crc % 256) / 256, crc_of[bxor(crc, bytes[i]) % 256 + 1])
    if crc < 0 then
      crc = crc + 4294967296
    end
  end
  return 4294967295 - crc
end

-- The bucket (0..BUCKETS-1) of an order id: (crc32(id) >> 4) % BUCKETS
-- (`crc`: the id's CRC-32 when the caller has it already).
local function bucket_of(id, crc)
  crc = crc or crc32(id)
  return (crc - crc % 16) / 16 % BUCKETS
end

-- Checking what a caller passes. Redis does not roll a script back: an
-- argument checked after the first write would leave a half-done change
-- behind an error. So every script checks all of its KEYS and ARGV first, by
-- the rules of the Python side (order ids and timeouts: listener/orders.py;
-- key prefix, retention, sweep batch: listener/config.py; key names:
-- listener/keys.py), and a refused call writes nothing. Every refusal is one
-- error reply in one form:
--   ERR <script>: <KEYS[i] or ARGV[i]> (<what>) is '<value>': <rule>; nothing changed
-- the value cut at 40 bytes and its unprintable bytes written as \xNN.

local MAX_TIMEOUT_MS = 2592000000        -- 30 days
local MAX_RETENTION_MS = 3153600000000   -- 100 years
local MAX_SWEEP_BATCH = 5000             -- also well below the 8000 values unpack() can give
local MAX_LEASE_MS = 3600000             -- an hour
local ID_RULE = "must be 1 to 128 characters of letters, digits, '-', '_', '.', ':'"
local RETENTION_RULE = 'must be whole milliseconds from 1 to ' .. MAX_RETENTION_MS ..
  ' (how long a cancelled order is kept: ORDER_LISTENER_RETENTION in ms)'

-- `value` as an error message shows it: quoted, printable, at most 40 bytes.
local function shown(value)
  if value == nil then
    return 'missing'
  end
  local text = string.gsub(string.sub(value, 1, 40), '[^%w%p ]', function(c)
    return string.format('\\x%02x', string.byte(c))
  end)
  if #value > 40 then
    text = text .. '...(' .. #value .. ' bytes)'
  end
  return "'" .. text .. "'"
end

-- The error reply refusing argument `slot` ('ARGV[2] (retention ms)') of `script`.
local function refuse(script, slot, value, rule)
  return redis.error_reply('ERR ' .. script .. ': ' .. slot .. ' is ' .. shown(value) .. ': ' .. rule ..
    '; nothing changed')
end

-- The error reply refusing a call with the wrong number of KEYS or ARGV.
local function refuse_shape(script, rule)
  return redis.error_reply('ERR ' .. script .. ': ' .. #KEYS .. ' KEYS and ' .. #ARGV .. ' ARGV given: ' ..
    rule .. '; nothing changed')
end

local function valid_id(id)
  return id ~= nil and #id >= 1 and #id <= 128 and not string.find(id, '[^A-Za-z0-9_.:%-]')
end

-- The number written in `text`, a whole number from low to high in decimal
-- digits ("1.5", "1e3", "0x64", " 100" and "-1" are not); nil otherwise.
local function whole(text, low, high)
  if text == nil or #text > 16 or not string.match(text, '^%d+$') then
    return nil
  end
  local n = tonumber(text)
  if n < low or n > high then
    return nil
  end
  return n
end

-- The key prefix and part P of `key` when it is '<prefix>:{P}:' .. rest as
-- listener/keys.py builds it (prefix: 1 to 64 letters, digits, '-', '_', '.';
-- P from 0 to 15, without leading zeros); nil otherwise.
local function split_key(key, rest)
  if key == nil or #key <= #rest or string.sub(key, #key - #rest + 1) ~= rest then
    return nil
  end
  local prefix, digits = string.match(string.sub(key, 1, #key - #rest), '^(.+):{(%d+)}:$')
  local part = whole(digits, 0, 15)
  if not part or tostring(part) ~= digits or #prefix > 64 or string.find(prefix, '[^A-Za-z0-9_.%-]') then
    return nil
  end
  return prefix, part
end

-- The checks of `lease` (ARGV: owner, ms) and `release` (ARGV: owner), both
-- with KEYS[1] the lease '<prefix>:{P}:lease': the error reply, or nil.
local function check_lease(name)
  local argv = name == 'lease' and '2 ARGV (owner, ms)' or '1 ARGV (owner)'
  if #KEYS ~= 1 or #ARGV ~= (name == 'lease' and 2 or 1) then
    return refuse_shape(name, 'must be 1 KEYS (lease) and ' .. argv)
  end
  if not split_key(KEYS[1], 'lease') then
    return refuse(name, 'KEYS[1] (lease)', KEYS[1], 'must be <prefix>:{P}:lease with P from 0 to 15')
  end
  if #ARGV[1] < 1 or #ARGV[1] > 1024 then
    return refuse(name, 'ARGV[1] (owner)', ARGV[1], 'must be 1 to 1024 bytes')
  end
  if name == 'lease' and not whole(ARGV[2], 1, MAX_LEASE_MS) then
    return refuse(name, 'ARGV[2] (ms)', ARGV[2], 'must be whole milliseconds from 1 to ' .. MAX_LEASE_MS)
  end
  return nil
end

-- The checks of `pause` (ARGV: reason, by) and `resume` (ARGV: wake channel,
-- grace ms), both with KEYS[1] the switch '<prefix>:{P}:pause': the error
-- reply, or nil and the key prefix and part.
local function check_switch(name)
  local argv = name == 'pause' and '2 ARGV (reason, by)' or '2 ARGV (wake channel, grace ms)'
  if #KEYS ~= 1 or #ARGV ~= 2 then
    return refuse_shape(name, 'must be 1 KEYS (pause switch) and ' .. argv)
  end
  local prefix, part = split_key(KEYS[1], 'pause')
  if not prefix then
    return refuse(name, 'KEYS[1] (pause switch)', KEYS[1], 'must be <prefix>:{P}:pause with P from 0 to 15')
  end
  if name == 'pause' then
    if #ARGV[1] > 1024 then
      return refuse(name, 'ARGV[1] (reason)', ARGV[1], 'must be at most 1024 bytes')
    end
    if #ARGV[2] < 1 or #ARGV[2] > 1024 then
      return refuse(name, 'ARGV[2] (by)', ARGV[2], 'must be 1 to 1024 bytes')
    end
  else
    if ARGV[1] ~= prefix .. ':wake' then
      return refuse(name, 'ARGV[1] (wake channel)', ARGV[1], 'must be ' .. prefix .. ':wake')
    end
    if not whole(ARGV[2], 0, MAX_TIMEOUT_MS) then
      return refuse(name, 'ARGV[2] (grace ms)', ARGV[2], 'must be whole milliseconds from 0 to ' ..
        MAX_TIMEOUT_MS .. ' (30 days)')
    end
  end
  return nil, prefix, part
end

-- A bucket field's value: a pending order's "<c>|<d>", or, once the sweep
-- cancelled it at its deadline, "<c>|<d>|<u>" (cancelled, version 2, reason
-- timeout, updated u: the record stays in its bucket until its retention
-- ends; see retire()). Returns c, d and u (nil while pending); nil for a
-- value of neither form.
local function unpack_bucket_value(packed)
  local c, d, u = string.match(packed, '^([^|]+)|(%d+)|(%d+)$')
  if c then
    return c, d, u
  end
  c, d = string.match(packed, '^([^|]+)|(%d+)$')
  return c, d, nil
end

-- The status a bucket field's value stands for.
local function bucket_status(packed)
  local _, _, u = unpack_bucket_value(packed)
  return u and 'cancelled' or 'created'
end

-- The record of order `id`: its own hash okey (s, v, r, c, d), or the field
-- `id` of its bucket bkey (pending, or cancelled by the sweep: see
-- unpack_bucket_value). Own-hash fields win; the bucket gives c and d where
-- the own hash has none. An own hash without s (only c and d: written by an
-- earlier create) is pending too. Returns status, version (as stored: a
-- string), reason, c, d, whether the bucket holds the order, and whether an
-- own hash does; nil when there is no record (neither an own hash with s or
-- c nor a bucket field). `no_own`: the caller knows okey does not exist (one
-- EXISTS over a whole batch of keys costs less than an HMGET of each).
local NO_FIELDS = {}
local function read_record(okey, bkey, id, no_own)
  local cur = no_own and NO_FIELDS or redis.call('HMGET', okey, 's', 'v', 'r', 'c', 'd')
  if cur[1] then
    return cur[1], cur[2], cur[3], cur[4], cur[5], false, true
  end
  -- HMGET, not HGET: the daemon's ACL user has no HGET (deploy/redis-users.acl)
  local packed = redis.call('HMGET', bkey, id)[1]
  local c, d = cur[4], cur[5]
  local own = (c or d) and true or false  -- (HMGET gives false, not nil, for a missing field)
  if packed then
    local pc, pd, pu = unpack_bucket_value(packed)
    c, d = c or pc, d or pd
    if pu then
      return 'cancelled', '2', 'timeout', c, d, true, own
    end
  end
  if not c and not packed then
    return nil
  end
  -- (a malformed bucket value leaves c or d nil: record_problem names it)
  return 'created', '1', 'created', c, d, packed and true or false, own
end

-- What is wrong with a record as read_record gives it, nil when nothing:
-- the version, the created entry id and the deadline go into every event.
local function record_problem(version, created, deadline)
  if not whole(version, 1, 1e15) then
    return 'version ' .. shown(version) .. ' is not a whole number from 1'
  end
  if created == nil or #created > 41 or not string.match(created, '^%d+%-%d+$') then
    return 'created entry id ' .. shown(created) .. ' is not <ms>-<seq>'
  end
  if not whole(deadline, 0, 1e15) then
    return 'deadline ' .. shown(deadline) .. ' is not a whole number of ms'
  end
  return nil
end

-- Frees what only a pending order has: timer, index member, bucket field.
-- Memory-freeing writes, so they come before the script's first HSET/XADD.
local function unpend(timer, index, bkey, id, in_bucket)
  redis.call('DEL', timer)
  redis.call('ZREM', index, id)
  if in_bucket then
    redis.call('HDEL', bkey, id)
  end
end

-- An order's history: fields of its own hash, `h<version>` (h1 its `created`
-- event, h2 the next, ...), one per event that announced a change of it:
-- "<status>|<previous>|<reason>|<version>|<at ms>|<created ms>|<deadline ms>"
-- (previous empty on `created`, deadline empty on events that carry none; at
-- most about 80 bytes, so the hash stays a listpack). In the record itself, it
-- is read with it and expires with it, at no key's cost. A pending order that
-- never changed has none (its one `created` event is rebuilt from the record),
-- and neither has one the sweep cancelled straight from pending (version 2,
-- `cancelled`, `timeout`: its `created` and `cancelled` events are rebuilt
-- from c, d and u; the sweep cancels most orders, and two items would be about
-- a third of the record). listener/events.py, from_packed, turns an item into
-- the published event; listener/store.py rebuilds the others.

-- The own hash of order `id` from its part's outbox key ('<base>outbox').
local function order_key(outbox, id)
  return string.sub(outbox, 1, #outbox - 6) .. 'o:' .. id
end

-- The creation ms of a record's `created` entry id ('<ms>-<seq>').
local function created_ms(created)
  return string.match(created, '^(%d+)')
end

-- The history item of an order's `created` event, from its record as it was
-- before its first change (creation entry id, first deadline).
local function created_item(created, deadline)
  local ms = created_ms(created)
  return 'created||created|1|' .. ms .. '|' .. ms .. '|' .. deadline
end

-- Appends one status event (any after `created`) to the part's outbox stream,
-- and to the order's history. `deadline` (ms) only on an event that leaves the
-- order `created` (extend): it is the new deadline the event announces. The
-- history item is written to the own hash here, or, when the caller gives
-- `fields` (the field-value list of the HSET it writes the record with),
-- added to those.
local function emit(outbox, id, status, previous, reason, version, at, created, deadline, fields)
  if deadline then
    redis.call('XADD', outbox, '*', 'o', id, 's', status, 'p', previous, 'r', reason,
               'v', version, 't', at, 'c', created, 'd', deadline)
  else
    redis.call('XADD', outbox, '*', 'o', id, 's', status, 'p', previous, 'r', reason,
               'v', version, 't', at, 'c', created)
  end
  local item = status .. '|' .. previous .. '|' .. reason .. '|' .. version .. '|' .. at .. '|' ..
    created_ms(created) .. '|' .. (deadline or '')
  if fields then
    fields[#fields + 1] = 'h' .. version
    fields[#fields + 1] = item
  else
    redis.call('HSET', order_key(outbox, id), 'h' .. version, item)
  end
end

-- Moves an order through `steps`, one event and one version per step, and
-- remembers `reason`: writes the order's own hash with all six fields s, v,
-- r, c, u, d (a pending order had only its bucket field, or an own hash with
-- c and d), and its history, in one HSET. A cancelled order keeps its
-- record, history included, for `retention` ms. An order's first change
-- (version 1 before it) starts its history with its `created` event: every
-- first change goes through advance. `deadline` is the record's deadline
-- after the change; `first_deadline` the one the order was created with,
-- when the change moves it (extend).
--
-- Numbers go to Redis as text made here (`now` and `retention` may come as
-- text already, made once by a caller that writes many orders): Redis formats
-- every number argument of a call itself, which costs more than the write.
local function advance(okey, outbox, id, status, version, created, deadline, steps, reason, now,
                       retention, first_deadline)
  local at = type(now) == 'string' and now or string.format('%d', now)
  local fields = {}
  if version == 1 then
    fields[1], fields[2] = 'h1', created_item(created, first_deadline or deadline)
  end
  local shown_version
  for _, nxt in ipairs(steps) do
    version = version + 1
    shown_version = string.format('%d', version)
    emit(outbox, id, nxt, status, reason, shown_version, at, created, nxt == 'created' and deadline or nil,
         fields)
    status = nxt
  end
  redis.call('HSET', okey, 's', status, 'v', shown_version, 'r', reason, 'c', created, 'u', at,
             'd', deadline, unpack(fields))
  if status == 'cancelled' then
    redis.call('PEXPIRE', okey, type(retention) == 'string' and retention or string.format('%d', retention))
  end
  return version
end

-- The pause switch of a part, '<prefix>:{P}:pause' (written by pause.lua and
-- resume.lua, one per part so every script reads the one of its own slot): a
-- hash with `since` (ms), `reason` and `by` while cancellation is paused; after
-- a resume with a grace also `resumed` and `until` (ms), and it expires at
-- `until`. Is the timeout of a pending order whose `deadline` (ms) has passed
-- held back at `now`? While paused: yes. During a grace: for the orders that
-- were due when cancellation resumed. A switch whose times are malformed
-- (written by hand) counts as paused: no order is cancelled on a doubt.
local function held(base, deadline, now)
  local switch = redis.call('HMGET', base .. 'pause', 'since', 'resumed', 'until')
  if not switch[1] then
    return false
  end
  local resumed, upto = tonumber(switch[2] or ''), tonumber(switch[3] or '')
  if not resumed or not upto then
    return true
  end
  return now < upto and tonumber(deadline) <= resumed
end

-- The checks of a transition call (shape below): the error reply, or nil
-- and the order's key base '<prefix>:{P}:' and CRC-32. spec.extra, for a
-- script whose ARGV[3] is not a reason: {what = 'extension ms', rule = ...,
-- ok = function(value) -> bool}.
local function check_transition(spec)
  local name, id = spec.name, ARGV[1]
  local third = spec.reasons and 'reason' or (spec.extra and spec.extra.what)
  if #KEYS ~= 4 or #ARGV ~= (third and 3 or 2) then
    return refuse_shape(name, 'must be 4 KEYS (order hash, timer, deadlines, outbox) and ' ..
      (third and '3 ARGV (order id, retention ms, ' .. third .. ')' or '2 ARGV (order id, retention ms)'))
  end
  if not valid_id(id) then
    return refuse(name, 'ARGV[1] (order id)', id, ID_RULE)
  end
  if not whole(ARGV[2], 1, MAX_RETENTION_MS) then
    return refuse(name, 'ARGV[2] (retention ms)', ARGV[2], RETENTION_RULE)
  end
  if spec.reasons and not spec.reasons[ARGV[3]] then
    return refuse(name, 'ARGV[3] (reason)', ARGV[3], 'must be ' .. spec.reasons_text)
  end
  if spec.extra and not spec.extra.ok(ARGV[3]) then
    return refuse(name, 'ARGV[3] (' .. spec.extra.what .. ')', ARGV[3], spec.extra.rule)
  end
  local crc = crc32(id)
  local prefix, part = split_key(KEYS[1], 'o:' .. id)
  if not prefix or part ~= crc % 16 then
    return refuse(name, 'KEYS[1] (order hash)', KEYS[1], 'must be <prefix>:{' .. crc % 16 .. '}:o:' .. id ..
      ' (P = crc32(id) % 16, see docs/reference.md, Redis key layout)')
  end
  local base = prefix .. ':{' .. part .. '}:'
  for i, rest in ipairs({'o:' .. id, 't:' .. id, 'deadlines', 'outbox'}) do
    if KEYS[i] ~= base .. rest then
      local what = ({'order hash', 'timer', 'deadlines', 'outbox'})[i]
      return refuse(name, 'KEYS[' .. i .. '] (' .. what .. ')', KEYS[i], 'must be ' .. base .. rest)
    end
  end
  return nil, base, crc
end

-- The shape of every transition script:
--   KEYS: order hash, timer key, deadline index of the part, outbox of the part
--         (the script also uses the order's bucket hash, built from the order
--         hash's name: same hash tag, same Cluster slot)
--   ARGV: order id, retention ms of finished orders, [reason]
-- spec: name, from (set of statuses), steps, reason, already(status, reason)
--       -> bool, due (the expiry itself: only once the deadline has passed),
--       reasons (the set ARGV[3] must be in, for scripts that take a reason;
--       reasons_text says it).
-- Returns {outcome, status, version, reason} with outcome one of
--   done | already | refused | unknown | notdue | held (the expiry, while
--   the pause switch holds the order's timeout back: see held());
-- or an error reply, having changed nothing, for a malformed call or record.
--
-- The deadline is the truth: once it has passed (by the Redis clock) the
-- payment window is closed, whether or not a daemon has swept the order yet.
-- Any operation on such an order first applies the timeout, so a late payment
-- is refused (the order is cancelled, reason timeout) and a late customer
-- cancel is a repeat of an achieved result. Unless the pause switch holds
-- the timeout back (held()): then the window is open, a late payment is
-- accepted and only the expiry waits.
--
-- Writes that free memory (DEL, ZREM, HDEL) come first: under maxmemory with
-- noeviction Redis refuses a script's memory-using write only while the
-- script has written nothing, so cancellations keep working when Redis is full.
local function transition(spec)
  local refused, base, crc = check_transition(spec)
  if refused then
    return refused
  end
  local okey, timer, index, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  local id, retention = ARGV[1], tonumber(ARGV[2])
  local bkey = base .. 'p:' .. bucket_of(id, crc)
  local status, version, reason, created, deadline, in_bucket = read_record(okey, bkey, id)
  if not status then
    return {'unknown', '', 0, ''}
  end
  local problem = record_problem(version, created, deadline)
  if problem then
    return redis.error_reply('ERR ' .. spec.name .. ': the stored record of ' .. shown(id) ..
      ' is malformed (' .. problem .. '); nothing changed')
  end
  version = tonumber(version)
  reason = reason or ''
  -- Reads of the keys it may write, so one of the wrong type (written by
  -- hand) fails the script here, before it wrote anything.
  redis.call('XLEN', outbox)
  if status == 'created' then
    redis.call('ZCARD', index)
  end
  local now = now_ms()
  local late = status == 'created' and tonumber(deadline) <= now
  if late and held(base, deadline, now) then
    if spec.due then
      return {'held', status, version, reason}
    end
    late = false
  end
  if late then
    unpend(timer, index, bkey, id, in_bucket)
    version = advance(okey, outbox, id, status, version, created, deadline, {'cancelled'}, 'timeout',
                      now, retention)
    if spec.due then
      return {'done', 'cancelled', version, 'timeout'}
    end
    status, reason = 'cancelled', 'timeout'
  elseif spec.from[status] then
    if spec.due then
      return {'notdue', status, version, reason}
    end
    if status == 'created' then
      unpend(timer, index, bkey, id, in_bucket)
    end
    version = advance(okey, outbox, id, status, version, created, deadline, spec.steps, spec.reason,
                      now, retention)
    return {'done', spec.steps[#spec.steps], version, spec.reason}
  end
  if spec.already(status, reason) then
    return {'already', status, version, reason}
  end
  return {'refused', status, version, reason}
end
