"""The Lua scripts that gateway.experiments runs in Redis: saving an experiment (its alias taken with it, compared
and set in one step) and setting an alias while no experiment holds it."""

# KEYS: the tenant's experiments, the experiment's audit log, the tenant's aliases, the state version, the
# tenant. ARGV: name, experiment JSON, change JSON, alias target ('' for none), alias, mode, revision, alias
# before, how many changes the audit log keeps (the latest). mode `change`: the experiment must exist (one changed
# as its tenant is deleted does not bring its keys back: 0) at the revision the change was made from (else -1:
# another change came first). mode `create`: the
# tenant must exist (-4: deleted since the caller looked, its keys not brought back for a tenant re-created
# under its name), the name must be free (-2), and the alias must still point where it did when the caller
# looked (-3 if it runs an experiment now, -1 if it moved otherwise), and the tenant must run (or have paused) fewer
# than ARGV[10] experiments (-5: counted here, or creates racing each other all passed a count made before).
# Compare-and-set: two processes cannot both win.
SAVE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[6] == 'create' then
  if redis.call('EXISTS', KEYS[5]) == 0 then return -4 end
  if raw then return -2 end
  local live = 0  -- found in pydantic's compact JSON, not decoded: a tenant keeps every ended experiment
  for _, stored in ipairs(redis.call('HVALS', KEYS[1])) do
    if string.find(stored, '"status":"running"', 1, true) or string.find(stored, '"status":"paused"', 1, true) then
      live = live + 1
    end
  end
  if live >= tonumber(ARGV[10]) then return -5 end
  local now = redis.call('HGET', KEYS[3], ARGV[5]) or ''
  if string.sub(now, 1, 11) == 'experiment:' then return -3 end
  if now ~= ARGV[8] then return -1 end
else
  if not raw then return 0 end
  if (cjson.decode(raw)['revision'] or 0) ~= tonumber(ARGV[7]) then return -1 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[9]), -1)
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[5], ARGV[4]) end
redis.call('INCR', KEYS[4])
return 1
"""

# KEYS: the tenant's aliases, the state version, the tenant's experiments, the tenant. ARGV: alias, target (''
# deletes). Refused (the alias's target returned) while the alias runs an experiment that exists, or (-1) when
# the tenant does not exist (deleted since the caller looked); else 1, or 0 for the deletion of an alias that is
# not there.
SET_ALIAS = """
if redis.call('EXISTS', KEYS[4]) == 0 then return -1 end
local now = redis.call('HGET', KEYS[1], ARGV[1])
if now and string.sub(now, 1, 11) == 'experiment:' and redis.call('HEXISTS', KEYS[3], string.sub(now, 12)) == 1 then
  return now
end
if ARGV[2] == '' then
  if not now then return 0 end
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('INCR', KEYS[2])
return 1
"""
