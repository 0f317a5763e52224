-- Edge behaviour the gRPC-JSON transcoder cannot express on its own.
--
-- Requests:
-- * A malformed client x-request-id is dropped, so the route puts a fresh one in its place; a
--   well-formed one is kept end to end.
-- * OpenAI clients use one path for unary and streamed completions and choose with the body's
--   top-level "stream": true. The transcoder maps a path to one RPC, so streamed bodies are sent
--   to the path of the server-streaming RPC (`<path>:stream`) before the transcoder runs.
--
-- Responses: a 429 always carries Retry-After (and a 503 does when the service said when): the
-- service's own `retry-after` metadata wins, then its google.rpc.RetryInfo, then one second.
-- A key refusal from the gateway (ext_authz) carries OpenAI's error JSON as its body, which Envoy
-- puts in grpc-message for gRPC callers: they get the plain message instead, and the gateway's
-- `x-ferry-grpc-status` replaces Envoy's status where its HTTP mapping is wrong (429 -> 14, not 8).
--
-- Not done here: OpenAI's closing `data: [DONE]` event. Envoy's Lua filter cannot add bytes after
-- a body it has streamed, and buffering would defeat streaming; OpenAI SDKs end cleanly without it.

local OPENAI_STREAMING = {
  ["/v1/chat/completions"] = "/v1/chat/completions:stream",
  ["/v1/completions"] = "/v1/completions:stream",
}
local DEFAULT_RETRY_AFTER = "1"

-- Index just past the closing quote of the JSON string that opens at `start`, or nil.
local function string_end(body, start)
  local i = start + 1
  while true do
    local e = string.find(body, '["\\]', i)
    if e == nil then
      return nil
    end
    if string.byte(body, e) == 92 then -- backslash: skip the escaped character
      i = e + 2
    else
      return e + 1
    end
  end
end

-- True when the top-level JSON object has the key "stream" set to true. Strings are skipped whole
-- and nesting is tracked, so a prompt or nested object that mentions "stream" is not mistaken for it.
local function wants_stream(body)
  local depth, i = 0, 1
  while true do
    local s = string.find(body, '["{}%[%]]', i)
    if s == nil then
      return false
    end
    local c = string.byte(body, s)
    if c == 34 then -- quote
      local after = string_end(body, s)
      if after == nil then
        return false
      end
      if depth == 1 and string.sub(body, s + 1, after - 2) == "stream" then
        -- A key is followed by a colon; the same word as a value is not.
        local value = string.match(body, "^%s*:%s*(%a+)", after)
        if value == "true" then
          return true
        end
      end
      i = after
    elseif c == 123 or c == 91 then -- { [
      depth = depth + 1
      i = s + 1
    else -- } ]
      depth = depth - 1
      i = s + 1
    end
  end
end

-- Whole seconds (rounded up) of the first RetryInfo.retry_delay ("1.500s") in a JSON error body.
local function retry_delay(body)
  local seconds = string.match(body, '"retry_delay"%s*:%s*"([%d%.]+)s"')
  if seconds == nil then
    return nil
  end
  local value = tonumber(seconds)
  if value == nil then
    return nil
  end
  return tostring(math.max(1, math.ceil(value)))
end

-- The request ids ferry accepts (services/common/context.py): 1-128 of [A-Za-z0-9._:-].
local function well_formed_request_id(id)
  return #id <= 128 and string.find(id, "^[%w%._:%-]+$") ~= nil
end

-- The IP of an address "1.2.3.4:5678" or "[::1]:5678".
local function address_ip(address)
  local ip = string.match(address, "^%[(.*)%]:%d+$") or string.match(address, "^(.*):%d+$")
  return ip or address
end

function envoy_on_request(handle)
  local headers = handle:headers()
  -- Only the edge check (ext_authz, after this filter) may say who the caller is.
  headers:remove("x-ferry-principal")
  -- The client's address as Envoy established it (use_remote_address, xff_num_trusted_hops), over
  -- anything the client sent: the edge check counts per-address limits by it, services are told it.
  headers:replace("x-ferry-client-address", address_ip(handle:streamInfo():downstreamRemoteAddress()))
  local request_id = headers:get("x-request-id")
  if request_id ~= nil and not well_formed_request_id(request_id) then
    -- The route adds a fresh one when none is present (request_headers_to_add: %UNIQUE_ID%).
    headers:remove("x-request-id")
  end
  if headers:get(":method") ~= "POST" then
    return
  end
  local path = headers:get(":path") or ""
  local bare, query = string.match(path, "^([^?]*)(.*)$")
  local streaming_path = OPENAI_STREAMING[bare]
  if streaming_path == nil then
    return
  end
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) then
    return
  end
  local body = handle:body()
  if body == nil then
    return
  end
  if wants_stream(body:getBytes(0, body:length())) then
    -- Wrappers taken before body() are dead once it has waited for the body: ask again.
    handle:headers():replace(":path", streaming_path .. query)
  end
end

-- The "message" of OpenAI's error JSON (`{"error": {"message": "...", ...}}`), unescaped, or nil.
local function error_message(text)
  if string.sub(text, 1, 1) ~= "{" then
    return nil
  end
  local s, e = string.find(text, '"message"%s*:%s*"')
  if s == nil then
    return nil
  end
  local after = string_end(text, e)
  if after == nil then
    return nil
  end
  local escaped = string.sub(text, e + 1, after - 2)
  return (string.gsub(escaped, "\\(.)", { n = " ", t = " ", ['"'] = '"', ["\\"] = "\\", ["/"] = "/" }))
end

function envoy_on_response(handle)
  -- A refusal by the edge check names the gRPC code where Envoy's HTTP mapping has none (429).
  local hint = handle:headers():get("x-ferry-grpc-status")
  if hint ~= nil then
    handle:headers():remove("x-ferry-grpc-status")
    if handle:headers():get("grpc-status") ~= nil then
      handle:headers():replace("grpc-status", hint)
    else
      handle:headers():remove("grpc-status-details-bin") -- REST: the JSON body says it all
    end
  end
  local grpc_message = handle:headers():get("grpc-message")
  if grpc_message ~= nil then
    local message = error_message(grpc_message)
    if message ~= nil then
      handle:headers():replace("grpc-message", message)
    end
  end
  local status = handle:headers():get(":status")
  if status ~= "429" and status ~= "503" then
    return
  end
  if handle:headers():get("retry-after") ~= nil then
    return -- the service said when (gRPC `retry-after` metadata arrives as a header)
  end
  -- Error bodies are small: read the google.rpc.RetryInfo the transcoder rendered, if any.
  local delay = nil
  local body = handle:body()
  if body ~= nil and body:length() > 0 then
    delay = retry_delay(body:getBytes(0, body:length()))
  end
  if delay == nil and status == "429" then
    delay = DEFAULT_RETRY_AFTER
  end
  if delay ~= nil then
    handle:headers():add("retry-after", delay)
  end
end
