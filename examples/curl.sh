#!/usr/bin/env bash
# The LD7 spec's curl examples (1, 4, 5, 6), in order, against a local botvisor.
#   BOTVISOR_URL=http://localhost:8000 API_KEY=your_api_key_here bash examples/curl.sh
set -euo pipefail
BASE_URL="${BOTVISOR_URL:-http://localhost:8000}"
API_KEY="${API_KEY:-your_api_key_here}"
USER_ID="${BOT_USER_ID:-bot_1234567890}"
PHONE="${BOT_PHONE:-1234567890}"

echo "# Example 1: create a bot"
curl -sS -X POST "$BASE_URL/api/sessions" \
  -H "Content-Type: application/json" \
  -H "X-API-Key: $API_KEY" \
  -d "{
    \"userId\": \"$USER_ID\",
    \"phoneNumber\": \"$PHONE\"
  }"
echo

echo "# Example 4: list all sessions"
curl -sS "$BASE_URL/api/sessions"
echo

echo "# Example 5: stop the session"
curl -sS -X POST "$BASE_URL/api/sessions/$USER_ID/stop" \
  -H "X-API-Key: $API_KEY"
echo

echo "# Example 6: delete the session"
curl -sS -X DELETE "$BASE_URL/api/sessions/$USER_ID" \
  -H "X-API-Key: $API_KEY"
echo
