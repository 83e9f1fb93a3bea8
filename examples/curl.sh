#!/usr/bin/env bash
# The LD7 spec's curl examples (1, 4, 5, 6), in order, against a local botvisor.
#   BOTVISOR_URL=http://localhost:8000 API_KEY=your_api_key_here bash examples/curl.sh
# Any HTTP error stops the script with a non-zero exit (after printing the answer).
set -euo pipefail
BASE_URL="${BOTVISOR_URL:-http://localhost:8000}"
API_KEY="${API_KEY:-your_api_key_here}"
# Its own default id, so the demo never touches a session you made from the README.
USER_ID="${BOT_USER_ID:-example_curl}"
PHONE="${BOT_PHONE:-1234567890}"

echo "# Example 1: create a bot"
curl -sS --fail-with-body -X POST "$BASE_URL/api/sessions" \
  -H "Content-Type: application/json" \
  -H "X-API-Key: $API_KEY" \
  -d "{
    \"userId\": \"$USER_ID\",
    \"phoneNumber\": \"$PHONE\"
  }"
echo

echo "# Example 4: list all sessions"
curl -sS --fail-with-body "$BASE_URL/api/sessions"
echo

echo "# Example 5: stop the session"
curl -sS --fail-with-body -X POST "$BASE_URL/api/sessions/$USER_ID/stop" \
  -H "X-API-Key: $API_KEY"
echo

echo "# Example 6: delete the session"
curl -sS --fail-with-body -X DELETE "$BASE_URL/api/sessions/$USER_ID" \
  -H "X-API-Key: $API_KEY"
echo
