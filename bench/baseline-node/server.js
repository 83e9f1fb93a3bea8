'use strict';
// Node.js baseline for botvisor-bench.
//
//   node server.js <http|express> <port> <sessions.json>
//
// Holds the session records of botvisor's `GET /api/sessions` (the file the bench
// writes) in a Map and serves the same read routes with the same JSON bytes:
//
//   GET /api/sessions/:id  {"success":true, ...session fields}
//   GET /api/sessions      {"success":true,"count":N,"sessions":[...]}
//   GET /api/stats         {"success":true,"activeSessions":..,"totalUsers":..,"onlineSessions":..}
//
// The stats are computed the way a typical Node server does it: by iterating the Map on
// every request. botvisor writes `success` first, then the fields in the order its
// response structs declare them (the order of its `GET /api/sessions` records), so the
// objects here are built in that order to give identical bytes.
// `http` mode uses only the http module; `express` mode is the stack of the LD7 Node
// server (Express with its defaults: ETag, X-Powered-By, express.json()).

const fs = require('fs');
const http = require('http');

const [mode, portArg, dataFile] = process.argv.slice(2);
if (!['http', 'express'].includes(mode) || !portArg || !dataFile) {
  console.error('usage: node server.js <http|express> <port> <sessions.json>');
  process.exit(2);
}
const port = Number(portArg);

const data = JSON.parse(fs.readFileSync(dataFile, 'utf8'));
const sessions = new Map();
for (const s of data.sessions) sessions.set(s.userId, s);

// States with a live (or about to be live) bot, as botvisor's `is_active`.
const INACTIVE = new Set(['stopped', 'failed', 'logged_out']);

// `{success: true, ...fields}`, success first.
function withSuccess(fields) {
  return { success: true, ...fields };
}

function stats() {
  let active = 0;
  let online = 0;
  for (const s of sessions.values()) {
    if (!INACTIVE.has(s.state)) active++;
    if (s.state === 'online') online++;
  }
  return { success: true, activeSessions: active, totalUsers: sessions.size, onlineSessions: online };
}

function list() {
  const all = [...sessions.values()];
  return { success: true, count: all.length, sessions: all };
}

function one(id) {
  const s = sessions.get(id);
  if (!s) return [404, { success: false, message: `Session ${id} not found` }];
  return [200, withSuccess(s)];
}

const NOT_FOUND = { success: false, message: 'Not found' };

let server;
if (mode === 'http') {
  server = http.createServer((req, res) => {
    const send = (status, body) => {
      const text = JSON.stringify(body);
      res.writeHead(status, {
        'Content-Type': 'application/json; charset=utf-8',
        'Content-Length': Buffer.byteLength(text),
        'Access-Control-Allow-Origin': '*',
      });
      res.end(text);
    };
    if (req.method !== 'GET') return send(405, { success: false, message: 'Method not allowed' });
    const path = req.url.split('?')[0];
    if (path === '/api/stats') return send(200, stats());
    if (path === '/api/sessions') return send(200, list());
    const m = /^\/api\/sessions\/([^/]+)$/.exec(path);
    if (m) return send(...one(decodeURIComponent(m[1])));
    return send(404, NOT_FOUND);
  });
} else {
  const express = require('express');
  const app = express();
  app.use(express.json());
  app.use((req, res, next) => {
    res.set('Access-Control-Allow-Origin', '*');
    next();
  });
  app.get('/api/stats', (req, res) => res.json(stats()));
  app.get('/api/sessions', (req, res) => res.json(list()));
  app.get('/api/sessions/:id', (req, res) => {
    const [status, body] = one(req.params.id);
    res.status(status).json(body);
  });
  app.use((req, res) => res.status(404).json(NOT_FOUND));
  server = http.createServer(app);
}

server.keepAliveTimeout = 65000;
server.listen(port, '127.0.0.1', () => {
  console.log(`baseline-node ${mode} listening on http://127.0.0.1:${server.address().port} (${sessions.size} sessions)`);
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
