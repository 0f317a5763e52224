"""OpenAI's API: chat completions, completions and models, in OpenAI's shapes (Envoy transcodes them
to OpenAI's REST paths; streams become Server-Sent Events)."""
