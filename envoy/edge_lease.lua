-- Edge leases (gateway/edge_lease.py, docs/deploy.md "Edge leases"): the key check's decision reused
-- without a round trip to the gateway.
--
-- This filter runs after the transcoder (`:path` is the gRPC method for REST and gRPC alike) and
-- before the key check (ext_authz). A request whose API key, method and client address hold a live
-- lease is admitted here: it gets the lease's Principal (`x-ferry-principal`) and this filter's
-- dynamic metadata `leased: true`, which turns the key check off for it (ext_authz's
-- filter_enabled_metadata, inverted: without that mark the check always runs). Any other request goes
-- to the key check; when that allows it and grants a lease (its dynamic metadata), the lease is kept
-- here for the requests that follow.
--
-- The gateway sizes each lease (how many requests, until when) so that it changes nothing a user can
-- see: the requests were counted against the key's limits when it was granted, and it ends before the
-- gateway would look the key up again (auth.cache_seconds), so a revocation takes effect as before.
-- Leases live in this worker's Lua state (each Envoy worker has its own), never leave Envoy, and are
-- forgotten all at once if too many pile up.
local NAMESPACE = "ferry.edge_lease"
local AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
local PRINCIPAL_HEADER = "x-ferry-principal"
-- Sent to the key check (`want`) when this worker will keep the lease it grants: not while a check of
-- the same key, method and address is already under way here (a second lease would replace the first,
-- and what was counted for it would be lost). A client's own copy is removed.
local LEASE_HEADER = "x-ferry-lease"
local MAX_LEASES = 10000
-- Requests sent to the key check, by ticket, until their answer says whether a lease came with it
-- (a request that never gets an answer leaves its ticket behind: they are dropped all at once too).
local MAX_PENDING = 10000

local leases, lease_count = {}, 0
local pending, pending_count, next_ticket = {}, 0, 0
-- The check under way for a lease key: {ticket, since (ms)}; after ASKING_MS without its answer (a
-- stream whose response headers wait for its first token, a client gone) it no longer holds leases back.
local asking = {}
local ASKING_MS = 1000

local function asking_now(key, now)
  local under_way = asking[key]
  return under_way ~= nil and now - under_way.since < ASKING_MS
end

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove(LEASE_HEADER) -- only this filter says it
  local authorization = headers:get("authorization")
  if authorization == nil or authorization == "" then
    return
  end
  -- The method (the transcoded gRPC path; a query string is no part of it), address and key.
  local method = string.match(headers:get(":path") or "", "^[^?]*")
  local key = method .. "\n" .. (headers:get("x-ferry-client-address") or "") .. "\n" .. authorization
  local now = handle:timestamp()
  local lease = leases[key]
  if lease ~= nil then
    if lease.left > 0 and now < lease.expires then
      -- A lease that cost nothing (a key without request limits) is renewed halfway through its
      -- life: one request asks for the next while the others go on, so steady traffic never finds
      -- it expired (and a burst after it meets a live one).
      local renewing = lease.renew ~= nil and now >= lease.renew and not asking_now(key, now)
      if not renewing then
        lease.left = lease.left - 1
        headers:replace(PRINCIPAL_HEADER, lease.principal)
        handle:streamInfo():dynamicMetadata():set(NAMESPACE, "leased", true)
        return
      end
    else
      leases[key] = nil
      lease_count = lease_count - 1
    end
  end
  local under_way = asking_now(key, now)
  if not under_way then
    headers:replace(LEASE_HEADER, "want")
  end
  if pending_count >= MAX_PENDING then
    pending, pending_count, asking = {}, 0, {}
  end
  next_ticket = next_ticket + 1
  if not under_way then
    asking[key] = { ticket = next_ticket, since = now }
  end
  pending[next_ticket] = { key = key, since = now }
  pending_count = pending_count + 1
  handle:streamInfo():dynamicMetadata():set(NAMESPACE, "ticket", next_ticket)
end

function envoy_on_response(handle)
  local metadata = handle:streamInfo():dynamicMetadata()
  local own = metadata:get(NAMESPACE)
  local ticket = own and own["ticket"]
  if ticket == nil then
    return
  end
  local sent = pending[ticket]
  if sent == nil then
    return
  end
  local key = sent.key
  pending[ticket] = nil
  pending_count = pending_count - 1
  local under_way = asking[key]
  if under_way ~= nil and under_way.ticket == ticket then
    asking[key] = nil
  end
  local headers = handle:headers()
  local status, grpc_status = headers:get(":status"), headers:get("grpc-status")
  if status == "401" or status == "403" or grpc_status == "16" or grpc_status == "7" then
    -- A renewal the key check refused (revoked, scopes changed): the old lease ends now.
    if leases[key] ~= nil then
      leases[key] = nil
      lease_count = lease_count - 1
    end
    return
  end
  local granted = metadata:get(AUTHZ_NAMESPACE)
  if granted == nil then
    return
  end
  local requests, ttl, principal = granted["lease_requests"], granted["lease_ttl_ms"], granted["lease_principal"]
  if type(requests) ~= "number" or type(ttl) ~= "number" or type(principal) ~= "string" then
    return
  end
  -- Counted from when this worker sent the check (never later than the gateway's own start).
  local expires = sent.since + ttl
  local renew = granted["lease_renew_ms"]
  if type(renew) == "number" then
    renew = sent.since + renew
  else
    renew = nil
  end
  if leases[key] == nil then
    if lease_count >= MAX_LEASES then
      leases, lease_count = {}, 0
    end
    lease_count = lease_count + 1
  end
  leases[key] = { left = requests, expires = expires, renew = renew, principal = principal }
end
