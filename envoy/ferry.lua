-- Edge behaviour the gRPC-JSON transcoder cannot express on its own.
--
-- Requests:
-- * A malformed client x-request-id is dropped, so the route puts a fresh one in its place; a
--   well-formed one is kept end to end.
-- * OpenAI clients use one path for unary and streamed completions and choose with the body's
--   top-level "stream": true. The transcoder maps a path to one RPC, so streamed bodies are sent
--   to the path of the server-streaming RPC (`<path>:stream`) before the transcoder runs.
-- * An OpenAI body's top-level keys go to the service (`x-ferry-body-fields`), which logs at debug
--   level those its request does not define: the transcoder ignores them, as vLLM does.
--
-- Responses: a 429 always carries Retry-After (and a 503 does when the service said when): the
-- service's own `retry-after` metadata wins, then its google.rpc.RetryInfo, then one second.
-- A key refusal from the gateway (ext_authz) carries OpenAI's error JSON as its body, which Envoy
-- puts in grpc-message for gRPC callers: they get the plain message instead, and the gateway's
-- `x-ferry-grpc-status` replaces Envoy's status where its HTTP mapping is wrong (429 -> 14, not 8).
--
-- OpenAI's paths (/v1/*): every error answer is OpenAI's error object,
-- `{"error": {"message", "type", "param", "code"}}` (codes: services/common/errors.py).
-- * A service error carries it ready-made in `x-ferry-openai-error` (its trailing metadata, which
--   Envoy makes a header): it becomes the body and the header goes.
-- * The edge's own refusals are worded here: the transcoder's plain-text 400s (a body that is not
--   JSON: invalid_json; a field of the wrong JSON type: invalid_type naming it; an unknown query
--   parameter: unknown_parameter), its 404 for an unknown path (unknown_url, OpenAI's
--   "Invalid URL (POST /v1/x)"), Envoy's own 5xx (service_unreachable, deadline_exceeded), and any
--   google.rpc.Status JSON without the header (typed by its code, coded by its ErrorInfo reason).
-- * Bodies already in OpenAI's shape (the key check's refusals, the 413) pass as they are.
-- Only error answers (status >= 400) are read whole; a 200 stream passes untouched. A stream's
-- error after it started is its last event, written by the service (openai_api/chunks.py).
-- ferry's own /api/v1/* keep google.rpc.Status JSON (the transcoder's and Envoy's plain-text answers
-- there become one, with an ErrorInfo of the same code), and gRPC callers their rich status.
local OPENAI_STREAMING = {
  ["/v1/chat/completions"] = "/v1/chat/completions:stream",
  ["/v1/completions"] = "/v1/completions:stream",
}
local DEFAULT_RETRY_AFTER = "1"
local OPENAI_PREFIX = "/v1/"
local OPENAI_ERROR_HEADER = "x-ferry-openai-error"
-- Dynamic metadata (this filter's namespace) marking an OpenAI request for the response: "POST /v1/x".
local METADATA_NAMESPACE = "envoy.filters.http.lua"
local OPENAI_REQUEST = "openai_request"
-- ... and one to ferry's own API (its errors are google.rpc.Status JSON): "POST /api/v1/x".
local API_PREFIX = "/api/"
local API_REQUEST = "api_request"
-- The top-level fields of an OpenAI request body, for the service to log those its API does not
-- define (the transcoder drops them silently): services/common/interceptor.py.
local BODY_FIELDS_HEADER = "x-ferry-body-fields"
local MAX_KEYS = 64

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

-- The keys of the top-level JSON object (the first MAX_KEYS, as written) and whether one is "stream"
-- set to true. Strings are skipped whole and nesting is tracked, so a prompt or nested object that
-- mentions "stream" is not mistaken for it.
local function top_level(body)
  local keys, stream = {}, false
  local depth, i = 0, 1
  while true do
    local s = string.find(body, '["{}%[%]]', i)
    if s == nil then
      return keys, stream
    end
    local c = string.byte(body, s)
    if c == 34 then -- quote
      local after = string_end(body, s)
      if after == nil then
        return keys, stream
      end
      -- A key is followed by a colon; the same word as a value is not.
      if depth == 1 and string.find(body, "^%s*:", after) then
        local key = string.sub(body, s + 1, after - 2)
        if #keys < MAX_KEYS then
          keys[#keys + 1] = key
        end
        if key == "stream" and string.match(body, "^%s*:%s*(%a+)", after) == "true" then
          stream = true
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

-- The keys as one header value: each cut to 64 characters, anything but [A-Za-z0-9_.-] as "?".
local function key_list(keys)
  local safe = {}
  for n, key in ipairs(keys) do
    safe[n] = string.gsub(string.sub(key, 1, 64), "[^%w_%.%-]", "?")
  end
  return table.concat(safe, ",")
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
  -- Only the edge check (ext_authz, after this filter) may say who the caller is, and only this
  -- filter which fields a body has.
  headers:remove("x-ferry-principal")
  headers:remove(BODY_FIELDS_HEADER)
  -- The client's address as Envoy established it (use_remote_address, xff_num_trusted_hops), over
  -- anything the client sent: the edge check counts per-address limits by it, services are told it.
  headers:replace("x-ferry-client-address", address_ip(handle:streamInfo():downstreamRemoteAddress()))
  local request_id = headers:get("x-request-id")
  if request_id ~= nil and not well_formed_request_id(request_id) then
    -- The route adds a fresh one when none is present (request_headers_to_add: %UNIQUE_ID%).
    headers:remove("x-request-id")
  end
  local method = headers:get(":method") or ""
  local path = headers:get(":path") or ""
  local bare, query = string.match(path, "^([^?]*)(.*)$")
  if string.sub(bare, 1, #OPENAI_PREFIX) == OPENAI_PREFIX then
    handle:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, OPENAI_REQUEST, method .. " " .. bare)
  elseif string.sub(bare, 1, #API_PREFIX) == API_PREFIX then
    handle:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, API_REQUEST, method .. " " .. bare)
  end
  if method ~= "POST" or string.sub(bare, 1, #OPENAI_PREFIX) ~= OPENAI_PREFIX then
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
  local keys, stream = top_level(body:getBytes(0, body:length()))
  -- Wrappers taken before body() are dead once it has waited for the body: ask again.
  headers = handle:headers()
  if #keys > 0 then
    headers:replace(BODY_FIELDS_HEADER, key_list(keys))
  end
  local streaming_path = OPENAI_STREAMING[bare]
  if stream and streaming_path ~= nil then
    headers:replace(":path", streaming_path .. query)
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

-- A JSON string literal of `text` (quotes, backslashes and control characters escaped).
local function json_string(text)
  local escaped = string.gsub(text, '[%c"\\]', function(c)
    local named = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }
    return named[c] or string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. escaped .. '"'
end

local function openai_error_json(message, type, param, code)
  local param_json = "null"
  if param ~= nil and param ~= "" then
    param_json = json_string(param)
  end
  return '{"error":{"message":' .. json_string(message) .. ',"type":' .. json_string(type)
    .. ',"param":' .. param_json .. ',"code":' .. json_string(code) .. "}}"
end

-- OpenAI's error type for an HTTP status: errors.OPENAI_TYPE by the gRPC code Envoy maps to it
-- (tests/test_envoy.py checks every code).
local OPENAI_TYPES = { [403] = "permission_error", [429] = "rate_limit_error", [504] = "timeout" }
local function openai_type(status)
  if OPENAI_TYPES[status] ~= nil then
    return OPENAI_TYPES[status]
  elseif status == 400 or status == 401 or status == 404 or status == 413 then
    return "invalid_request_error"
  end
  return "server_error" -- 409 (ALREADY_EXISTS, ABORTED), 499, 5xx
end

-- The code of an error without a ferry reason: the gRPC code's name, by number or by HTTP status.
local GRPC_CODE_NAMES = {
  [1] = "cancelled", [2] = "unknown", [3] = "invalid_argument", [4] = "deadline_exceeded",
  [5] = "not_found", [6] = "already_exists", [7] = "permission_denied", [8] = "resource_exhausted",
  [9] = "failed_precondition", [10] = "aborted", [11] = "out_of_range", [12] = "unimplemented",
  [13] = "internal", [14] = "unavailable", [15] = "data_loss", [16] = "unauthenticated",
}
local HTTP_CODE_NAMES = {
  [400] = "invalid_argument", [401] = "unauthenticated", [403] = "permission_denied",
  [404] = "not_found", [409] = "aborted", [429] = "resource_exhausted", [499] = "cancelled",
  [500] = "internal", [501] = "unimplemented", [502] = "service_unreachable", [503] = "service_unreachable",
  [504] = "deadline_exceeded",
}

-- What the transcoder's "for type X" expects, in JSON's words.
local function expected(proto_type)
  if string.sub(proto_type, 1, 5) ~= "TYPE_" then -- type.googleapis.com/<message>
    return "a JSON object (" .. (string.match(proto_type, "([%w_]+)$") or proto_type) .. ")"
  elseif proto_type == "TYPE_DOUBLE" or proto_type == "TYPE_FLOAT" then
    return "a number"
  elseif proto_type == "TYPE_BOOL" then
    return "a boolean"
  elseif proto_type == "TYPE_STRING" or proto_type == "TYPE_BYTES" then
    return "a string"
  end
  return "an integer" -- TYPE_INT32, TYPE_UINT64, TYPE_SINT32, TYPE_FIXED64...
end

-- The field as the caller wrote it: a map entry (`logit_bias[0].value`) is its map (`logit_bias`);
-- ferry's OpenAI messages have no repeated message with a `key` or `value` field (tests/test_envoy.py).
local function caller_field(path)
  return string.match(path, "^(.*)%[%d+%]%.key$") or string.match(path, "^(.*)%[%d+%]%.value$") or path
end

-- At most TEXT_LIMIT bytes of `text`, cut at a UTF-8 character boundary: the transcoder quotes the
-- offending value whole (a 1 MB string made a 2 MB error body); errors.TEXT_LIMIT is the same bound.
local TEXT_LIMIT = 512
local function cut_text(text)
  if #text <= TEXT_LIMIT then
    return text
  end
  local cut = TEXT_LIMIT - 3
  while cut > 0 do
    local byte = string.byte(text, cut + 1)
    if byte < 0x80 or byte >= 0xC0 then -- the next byte starts a character
      break
    end
    cut = cut - 1
  end
  return string.sub(text, 1, cut) .. "..."
end

-- The message, OpenAI type, param and code of an answer the transcoder or Envoy made (plain text), or
-- of a google.rpc.Status JSON without ferry's header. `request` is "METHOD /path".
local function edge_error(status, text, request)
  local first_line = cut_text(string.match(text, "^[^\n]*"))
  if string.sub(text, 1, 1) == "{" then
    local code = string.match(text, '"reason"%s*:%s*"([%w_]+)"')
    local number = tonumber(string.match(text, '^{%s*"code"%s*:%s*(%d+)'))
    return error_message(text) or first_line,
      openai_type(status),
      string.match(text, '"field"%s*:%s*"([^"\\]*)"'),
      code and string.lower(code) or GRPC_CODE_NAMES[number] or HTTP_CODE_NAMES[status] or "http_" .. status
  end
  if status == 400 then
    local unknown = string.match(first_line, '^Could not find field "([^"]*)" in the type')
    if unknown ~= nil then
      return "unrecognized request argument supplied: " .. unknown, "invalid_request_error", unknown, "unknown_parameter"
    end
    -- "<field path>: <what>", the path empty for the body itself.
    local path, what = string.match(first_line, "^([%w_%.%[%]]*): (.+)$")
    if path ~= nil then
      local field = caller_field(path)
      local value, proto_type = string.match(what, "^invalid value (.+) for type (%S+)$")
      local message
      if what == "Root element must be a message." then
        message = "the request body must be a JSON object"
      elseif field == "" then -- the transcoder lost the path ("Proto field is not repeating, ...")
        message = "invalid type in the request body: " .. what
      elseif value ~= nil then
        message = "invalid type for '" .. field .. "': expected " .. expected(proto_type) .. ", got " .. value
      else
        message = "invalid type for '" .. field .. "': " .. what
      end
      return message, "invalid_request_error", field, "invalid_type"
    end
    return "could not parse the JSON body of the request: " .. first_line, "invalid_request_error", nil, "invalid_json"
  end
  if status == 404 and string.find(first_line, "^Could not resolve ") then
    return "Invalid URL (" .. request .. ")", "invalid_request_error", nil, "unknown_url"
  end
  -- Envoy's own: "no healthy upstream", "upstream request timeout", or nothing (the key check failed).
  local code = HTTP_CODE_NAMES[status] or "http_" .. status
  local message = first_line
  if message == "" then
    message = "the edge answered " .. status .. " (" .. code .. ")"
  end
  return message, openai_type(status), nil, code
end

local function openai_body(status, text, request)
  return openai_error_json(edge_error(status, text, request))
end

-- The gRPC code Envoy's transcoder maps to an HTTP status (the inverse of its mapping).
local HTTP_GRPC_CODES = {
  [400] = 3, [401] = 16, [403] = 7, [404] = 5, [409] = 10, [413] = 8, [429] = 8, [499] = 1,
  [500] = 13, [501] = 12, [502] = 14, [503] = 14, [504] = 4,
}

-- ferry's own API (/api/*): the same answer as a google.rpc.Status JSON with one ErrorInfo (and a
-- BadRequest naming the field when there is one), as the services' own errors are rendered.
local function status_body(status, text, request)
  local message, _, param, code = edge_error(status, text, request)
  local details = '{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":' .. json_string(string.upper(code))
    .. ',"domain":"ferry.dev"}'
  if param ~= nil and param ~= "" then
    details = details .. ',{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":'
      .. json_string(param) .. ',"description":' .. json_string(message) .. "}]}"
  end
  return '{"code":' .. (HTTP_GRPC_CODES[status] or 2) .. ',"message":' .. json_string(message)
    .. ',"details":[' .. details .. "]}"
end

-- True for a body already in OpenAI's error shape (the key check's refusals, the 413).
local function is_openai_error(text)
  return string.find(text, '^%s*{%s*"error"%s*:') ~= nil
end

-- The Retry-After a 429 (always) or a 503 (when the service said when) gets, or nil: the service's
-- `retry-after` metadata is already the header; else its RetryInfo as the transcoder rendered it.
local function missing_retry_after(status, headers, text)
  if (status ~= 429 and status ~= 503) or headers:get("retry-after") ~= nil then
    return nil
  end
  local delay = retry_delay(text)
  if delay == nil and status == 429 then
    delay = DEFAULT_RETRY_AFTER
  end
  return delay
end

function envoy_on_response(handle)
  local headers = handle:headers()
  -- A refusal by the edge check names the gRPC code where Envoy's HTTP mapping has none (429).
  local hint = headers:get("x-ferry-grpc-status")
  if hint ~= nil then
    headers:remove("x-ferry-grpc-status")
    if headers:get("grpc-status") ~= nil then
      headers:replace("grpc-status", hint)
    else
      headers:remove("grpc-status-details-bin") -- REST: the JSON body says it all
    end
  end
  local grpc_message = headers:get("grpc-message")
  if grpc_message ~= nil then
    local message = error_message(grpc_message)
    if message ~= nil then
      headers:replace("grpc-message", message)
    end
  end
  local openai_error = headers:get(OPENAI_ERROR_HEADER)
  if openai_error ~= nil then
    headers:remove(OPENAI_ERROR_HEADER)
  end
  local status = tonumber(headers:get(":status")) or 0
  local content_type = headers:get("content-type") or ""
  if status < 400 or string.find(content_type, "application/grpc", 1, true) then
    return
  end
  local metadata = handle:streamInfo():dynamicMetadata():get(METADATA_NAMESPACE)
  local request = metadata and metadata[OPENAI_REQUEST]
  local api_request = metadata and metadata[API_REQUEST]
  if request == nil and api_request == nil and status ~= 429 and status ~= 503 then
    return
  end
  -- Error bodies are small: read it whole (true: a buffer even when the answer has no body).
  local body = handle:body(true)
  local text = body:getBytes(0, body:length())
  headers = handle:headers() -- wrappers taken before body() are dead once it has waited
  local delay = missing_retry_after(status, headers, text)
  if delay ~= nil then
    headers:add("retry-after", delay)
  end
  if request == nil and api_request ~= nil and string.find(text, "^%s*{") == nil then
    -- The transcoder's and Envoy's own plain-text answers on ferry's API (a body that is not JSON,
    -- an unknown path or verb, no healthy upstream): google.rpc.Status JSON like every other error.
    local json = status_body(status, text, api_request)
    body:setBytes(json)
    headers:replace("content-type", "application/json")
    headers:replace("content-length", tostring(#json))
    return
  end
  if request == nil or (openai_error == nil and is_openai_error(text)) then
    return
  end
  local envoy_made = openai_error == nil and string.sub(text, 1, 1) ~= "{"
  if status == 503 and envoy_made and headers:get("retry-after") == nil then
    -- Envoy's own 503 (service_unreachable) is worth retrying, as the catalogue says.
    headers:add("retry-after", DEFAULT_RETRY_AFTER)
  end
  local json = openai_error or openai_body(status, text, request)
  body:setBytes(json)
  headers:replace("content-type", "application/json")
  headers:replace("content-length", tostring(#json))
end
