/** Prometheus text exposition of every device's counters, on a loopback HTTP port. */
import * as http from 'node:http';
import { BlockError } from '../errors';
import { LatencyHistogram, OPERATIONS } from '../stats';
import type { DeviceTable } from './devices';

export function renderMetrics(devices: DeviceTable): string {
  const lines: string[] = [];
  const family = (name: string, type: string, help: string) => lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
  const all = devices.list();
  const label = (device: string, op?: string) => `{device="${device}"${op ? `,op="${op}"` : ''}}`;

  family('tapkit_requests_total', 'counter', 'Requests completed, by device and operation.');
  for (const d of all) for (const op of OPERATIONS) lines.push(`tapkit_requests_total${label(d.id, op)} ${d.vbd.stats().operations[op].count}`);
  family('tapkit_bytes_total', 'counter', 'Bytes moved by successful requests.');
  for (const d of all) for (const op of OPERATIONS) lines.push(`tapkit_bytes_total${label(d.id, op)} ${d.vbd.stats().operations[op].bytes}`);
  family('tapkit_errors_total', 'counter', 'Requests that failed.');
  for (const d of all) for (const op of OPERATIONS) lines.push(`tapkit_errors_total${label(d.id, op)} ${d.vbd.stats().operations[op].errors}`);
  family('tapkit_in_flight', 'gauge', 'Requests being served now.');
  for (const d of all) lines.push(`tapkit_in_flight${label(d.id)} ${d.vbd.stats().inFlight}`);
  family('tapkit_queued', 'gauge', 'Requests held while the device is paused.');
  for (const d of all) lines.push(`tapkit_queued${label(d.id)} ${d.vbd.stats().queued}`);
  family('tapkit_paused', 'gauge', '1 while the device is paused.');
  for (const d of all) lines.push(`tapkit_paused${label(d.id)} ${d.vbd.isPaused ? 1 : 0}`);
  family('tapkit_size_bytes', 'gauge', 'Virtual size of the device.');
  for (const d of all) lines.push(`tapkit_size_bytes${label(d.id)} ${d.vbd.info().size}`);

  family('tapkit_request_duration_seconds', 'histogram', 'Request latency.');
  for (const d of all) {
    for (const op of OPERATIONS) {
      const h: LatencyHistogram = d.vbd.histogram(op);
      let cumulative = 0;
      h.counts.forEach((count, i) => {
        cumulative += count;
        const bound = LatencyHistogram.bound(i);
        const le = bound === Infinity ? '+Inf' : String(bound / 1e6);
        lines.push(`tapkit_request_duration_seconds_bucket{device="${d.id}",op="${op}",le="${le}"} ${cumulative}`);
      });
      lines.push(`tapkit_request_duration_seconds_sum${label(d.id, op)} ${h.sum / 1e6}`);
      lines.push(`tapkit_request_duration_seconds_count${label(d.id, op)} ${h.total}`);
    }
  }
  return `${lines.join('\n')}\n`;
}

/** Serves /metrics on a loopback address only. */
export async function startMetrics(address: string, devices: DeviceTable): Promise<http.Server> {
  const m = /^(127\.\d+\.\d+\.\d+|localhost|\[::1\]):(\d+)$/.exec(address);
  if (!m) throw new BlockError('EINVAL', `metrics address '${address}' must be a loopback HOST:PORT (127.0.0.1:9101)`);
  const server = http.createServer((req, res) => {
    if (req.url !== '/metrics') {
      res.writeHead(404).end('see /metrics\n');
      return;
    }
    res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' }).end(renderMetrics(devices));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(Number(m[2]), m[1].replace(/[[\]]/g, ''), () => resolve());
  });
  return server;
}
