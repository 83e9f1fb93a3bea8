// Checks a botvisor webhook's signature (receiver side). Use the raw body, as received.
const crypto = require("crypto");

function verify(secret, headers, rawBody, maxAgeS = 300) {
  const ts = headers["x-botvisor-timestamp"];
  if (Math.abs(Date.now() / 1000 - Number(ts)) > maxAgeS) return false; // old replay
  const mac = crypto.createHmac("sha256", secret).update(`${ts}.`).update(rawBody).digest("hex");
  const given = Buffer.from(headers["x-botvisor-signature"] || "");
  const want = Buffer.from(`v1=${mac}`);
  return given.length === want.length && crypto.timingSafeEqual(given, want);
} // Then deduplicate on headers["x-botvisor-event-id"]: a delivery can be retried.

module.exports = { verify };
