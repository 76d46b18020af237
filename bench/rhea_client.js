#!/usr/bin/env node
// A lean AMQP 1.0 load client on rhea (Node.js), the same phases as lean_client.py.
//
// One connection, one dynamic receiver, one sender with pre-settled transfers; the
// request is encoded once and only its message-id digits change per call. Prints one
// JSON object on stdout. Bounded in count per phase and by --time-limit seconds.
'use strict';

const fs = require('fs');
const os = require('os');
const rhea = require('rhea');

const ID_PREFIX = 'bench-';
const ID_DIGITS = 10;
const ID_MARK = ID_PREFIX + '@'.repeat(ID_DIGITS);
const RESULT_MARK = Buffer.from('{"result"');

function parseArgs(argv) {
  const ns = {
    url: 'amqp://127.0.0.1:5672', method: 'virDomainGetInfo', body: '{"domain":{"name":"test"}}',
    warmup: 500, warmupPipelined: 2000, sequential: 2000, pipelined: 20000, window: 100,
    timeLimit: 60, agentPid: 0,
  };
  const names = {
    '--url': 'url', '--method': 'method', '--body': 'body', '--warmup': 'warmup',
    '--warmup-pipelined': 'warmupPipelined', '--sequential': 'sequential', '--pipelined': 'pipelined',
    '--window': 'window', '--time-limit': 'timeLimit', '--agent-pid': 'agentPid',
  };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (!key || i + 1 >= argv.length) throw new Error(`bad argument ${argv[i]}`);
    ns[key] = typeof ns[key] === 'number' ? Number(argv[i + 1]) : argv[i + 1];
  }
  for (const k of ['warmup', 'warmupPipelined', 'sequential', 'pipelined']) {
    ns[k] = Math.max(0, Math.min(ns[k] | 0, 1000000));
  }
  ns.window = Math.max(1, Math.min(ns.window | 0, 1000));
  return ns;
}

function procCpuSeconds(pid) {
  if (!pid) return null;
  try {
    const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = text.slice(text.lastIndexOf(')') + 1).trim().split(/\s+/);
    return (Number(fields[11]) + Number(fields[12])) / 100; // USER_HZ is 100 on Linux
  } catch (e) {
    return null;
  }
}

function ownCpuSeconds() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

function percentile(sorted, q) {
  if (!sorted.length) return NaN;
  const k = Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))));
  return sorted[k];
}

const round1 = (x) => Math.round(x * 10) / 10;

function main() {
  const ns = parseArgs(process.argv.slice(2));
  const url = new URL(ns.url);
  const plan = [
    ['warmup_seq', ns.warmup, 1], ['warmup_pipelined', ns.warmupPipelined, ns.window],
    ['sequential', ns.sequential, 1], ['pipelined', ns.pipelined, ns.window],
  ].filter((p) => p[1] > 0);
  const results = {};
  let errors = 0; let replies = 0; let failure = null; let finished = false;
  let prefix = null; let suffix = null;
  let nextId = 0; let firstId = 0; let index = -1;
  let name = ''; let count = 0; let windowSize = 1; let sent = 0; let received = 0;
  let sentAt = null; let latencies = []; let t0 = 0n; let cpu0 = [0, null];
  let started = false; let sender = null; let receiver = null; let connection = null;

  const container = rhea.create_container({ id: `bench-${process.pid}` });
  const timer = setTimeout(() => fail(`time limit of ${ns.timeLimit} s reached in phase ${name || 'connect'}`),
    ns.timeLimit * 1000);

  function finish() {
    if (finished) return;
    finished = true;
    clearTimeout(timer);
    const out = { client: 'node-rhea', url: ns.url, method: ns.method, errors, replies, failure, ...results };
    process.stdout.write(JSON.stringify(out) + '\n');
    process.exitCode = failure || errors ? 1 : 0;
    if (connection) connection.close();
    setTimeout(() => process.exit(), 1000); // do not wait on the close handshake for long
  }

  function fail(why) {
    if (!failure) failure = why;
    finish();
  }

  function prepare(replyTo) {
    const data = rhea.message.encode({
      message_id: ID_MARK, reply_to: replyTo, subject: ns.method, content_type: 'application/json',
      body: rhea.message.data_section(Buffer.from(ns.body)),
    });
    const mark = Buffer.from(ID_MARK);
    const at = data.indexOf(mark);
    prefix = data.subarray(0, at + ID_PREFIX.length);
    suffix = data.subarray(at + mark.length);
  }

  function nextPhase() {
    index += 1;
    if (index >= plan.length) {
      finish();
      return;
    }
    [name, count, windowSize] = plan[index];
    sent = 0; received = 0; firstId = nextId;
    sentAt = new Float64Array(count);
    latencies = [];
    cpu0 = [ownCpuSeconds(), procCpuSeconds(ns.agentPid)];
    t0 = process.hrtime.bigint();
    fill();
  }

  function fill() {
    if (finished || !started) return;
    while (sent < count && sent - received < windowSize && sender.sendable()) {
      const n = nextId++;
      const digits = Buffer.from(String(n).padStart(ID_DIGITS, '0'));
      sender.send(Buffer.concat([prefix, digits, suffix]), undefined, 0);
      sentAt[sent] = Number(process.hrtime.bigint() - t0);
      sent += 1;
    }
  }

  function endPhase(tNs) {
    const elapsed = tNs / 1e9;
    latencies.sort((a, b) => a - b);
    const sum = latencies.reduce((a, b) => a + b, 0);
    const out = {
      calls: count, window: windowSize, seconds: Math.round(elapsed * 1e4) / 1e4,
      calls_per_s: elapsed > 0 ? round1(count / elapsed) : null,
      p50_us: round1(percentile(latencies, 0.5) / 1e3), p99_us: round1(percentile(latencies, 0.99) / 1e3),
      mean_us: latencies.length ? round1(sum / latencies.length / 1e3) : null,
      client_cpu_us_per_call: round1((ownCpuSeconds() - cpu0[0]) / count * 1e6),
    };
    const agentNow = procCpuSeconds(ns.agentPid);
    if (agentNow !== null && cpu0[1] !== null) out.agent_cpu_us_per_call = round1((agentNow - cpu0[1]) / count * 1e6);
    results[name] = out;
  }

  function maybeStart() {
    if (!started && sender && prefix && sender.sendable()) {
      started = true;
      nextPhase();
    }
  }

  container.on('connection_open', (ctx) => {
    const props = ctx.connection.properties || {};
    const address = props['busagent-rpc'];
    if (!address) {
      fail('the agent did not tell its rpc address (busagent-rpc)');
      return;
    }
    sender = ctx.connection.open_sender({ target: { address: String(address) }, snd_settle_mode: 1 });
    receiver = ctx.connection.open_receiver({ source: { dynamic: true }, credit_window: 2000, autoaccept: false });
  });
  container.on('receiver_open', (ctx) => {
    const address = ctx.receiver.source && ctx.receiver.source.address;
    if (!address) {
      fail('no address for the dynamic receiver');
      return;
    }
    prepare(address);
    maybeStart();
  });
  container.on('sendable', () => {
    if (started) fill(); else maybeStart();
  });
  container.on('message', (ctx) => {
    const t = Number(process.hrtime.bigint() - t0);
    replies += 1;
    ctx.delivery.update(true); // settle locally (the agent pre-settles): frees the session buffer
    const msg = ctx.message;
    const body = msg.body && msg.body.content !== undefined ? msg.body.content : msg.body;
    const raw = Buffer.isBuffer(body) ? body : Buffer.from(String(body));
    if (raw.indexOf(RESULT_MARK) < 0) {
      errors += 1;
      if (!results.first_error) results.first_error = raw.toString();
    }
    const cid = String(msg.correlation_id);
    const i = Number(cid.slice(ID_PREFIX.length)) - firstId;
    if (!cid.startsWith(ID_PREFIX) || !Number.isInteger(i)) {
      errors += 1;
      return;
    }
    if (finished || i < 0 || i >= count) return;
    latencies.push(t - sentAt[i]);
    received += 1;
    if (received >= count) {
      endPhase(t);
      nextPhase();
    } else {
      fill();
    }
  });
  container.on('receiver_close', () => fail('reply link closed by the agent'));
  container.on('sender_close', () => fail('request link closed by the agent'));
  container.on('connection_close', () => { if (!finished) fail('connection closed by the agent'); });
  container.on('disconnected', (ctx) => {
    if (!finished) fail(`disconnected: ${ctx.error ? ctx.error.message || ctx.error : 'socket closed'}`);
  });
  container.on('error', (ctx) => fail(`error: ${ctx.error}`));

  connection = container.connect({
    host: url.hostname || '127.0.0.1', port: Number(url.port || 5672), reconnect: false,
    hostname: url.hostname, container_id: `bench-${os.hostname()}-${process.pid}`,
  });
}

main();
