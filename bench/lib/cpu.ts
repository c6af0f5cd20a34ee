/**
 * CPU accounting from /proc (bench-method.md §4–5): the server's own CPU from
 * /proc/PID/stat, the client's as our waited-for children's, and "foreign" CPU — what the
 * rest of the machine used meanwhile — plus the hypervisor's steal. The quiet gate waits
 * (bounded) for the neighbours to calm down before a measurement.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { sleepSync } from './processes';

export const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout?.trim()) || 100;

/** Busy (user+nice+system+irq+softirq) and steal jiffies of the whole machine. */
export function machineTicks(): { busy: number; steal: number } {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  return { busy: f[0] + f[1] + f[2] + (f[5] ?? 0) + (f[6] ?? 0), steal: f[7] ?? 0 };
}

/** utime+stime of a process (all threads), or with `children` of its waited-for children; 0 once it is gone. */
export function processTicks(pid: number | 'self', children = false): number {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return children ? Number(f[13]) + Number(f[14]) : Number(f[11]) + Number(f[12]);
  } catch {
    return 0;
  }
}

const sumTicks = (pids: number[]) => pids.reduce((s, p) => s + processTicks(p), 0);

export interface CpuSample {
  seconds: number;
  /** CPU-seconds used by the given server processes. */
  serverSeconds: number;
  /** CPU-seconds of the runner's waited-for children and the runner itself (the client). */
  clientSeconds: number;
  /** Everything else, % of one CPU. */
  foreignPct: number;
  /** Hypervisor steal, % of one CPU. */
  stealPct: number;
}

/**
 * Starts a meter over the server PIDs (may be empty: then the work is done by our own
 * waited-for children, e.g. a converter). Call the returned function when the work is done.
 * Processes listed in `alsoOurs` (nginx, kernel-side helpers we own) count neither as
 * server nor as foreign.
 */
export function startCpuMeter(serverPids: number[], alsoOurs: number[] = []): () => CpuSample {
  const m0 = machineTicks();
  const s0 = sumTicks(serverPids);
  const o0 = sumTicks(alsoOurs);
  const c0 = processTicks('self', true) + processTicks('self');
  const t0 = process.hrtime.bigint();
  return () => {
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const server = sumTicks(serverPids) - s0;
    const ours = sumTicks(alsoOurs) - o0;
    const client = processTicks('self', true) + processTicks('self') - c0;
    const m1 = machineTicks();
    const pct = (ticks: number) => (100 * ticks) / CLK_TCK / seconds;
    return {
      seconds,
      serverSeconds: server / CLK_TCK,
      clientSeconds: client / CLK_TCK,
      foreignPct: Math.max(0, pct(m1.busy - m0.busy - server - client - ours)),
      stealPct: pct(m1.steal - m0.steal),
    };
  };
}

/**
 * The quiet gate: QUIET_MAX (% of a CPU, default 15) is the most the neighbours may use,
 * QUIET_WAIT (s, default 60) the longest wait before one measurement, QUIET_BUDGET (s,
 * default 900) the total over the whole run (one budget per process). After that the
 * bench measures anyway and the recorded foreign CPU tells the story.
 */
const QUIET_MAX = Number(process.env.QUIET_MAX ?? 15);
const QUIET_WAIT = Number(process.env.QUIET_WAIT ?? 60);
let quietBudget = Number(process.env.QUIET_BUDGET ?? 900);

/** Above this foreign CPU (% of one CPU) a cell is flagged noisy. */
export const NOISY_FOREIGN_PCT = Number(process.env.NOISY_PCT ?? 25);

/** Waits until processes other than `ourPids` use less than QUIET_MAX % of a CPU (bounded). */
export function waitQuiet(ourPids: number[] = []): void {
  let waited = 0;
  while (quietBudget > 0 && QUIET_WAIT > 0) {
    const meter = startCpuMeter(ourPids);
    sleepSync(1);
    const busy = meter().foreignPct;
    if (busy < QUIET_MAX) return;
    if (waited === 0) process.stderr.write(`  machine busy (others use ${busy.toFixed(0)}% of a CPU); waiting up to ${QUIET_WAIT}s\n`);
    waited++;
    quietBudget--;
    if (waited >= QUIET_WAIT) {
      process.stderr.write('  still busy; measuring anyway\n');
      return;
    }
  }
  if (waited > 0) process.stderr.write('  quiet-waiting budget spent; no more waiting\n');
}

/** One measured piece of work. */
export interface Sample {
  seconds: number;
  /** CPU-seconds of the measured process(es). */
  cpu: number;
  /** Other processes' CPU during the measurement, % of one CPU. */
  foreign: number;
  steal: number;
}

/** Measures `fn`; `serverPid` is a long-running server (else the work is our waited-for children). */
export async function measure(fn: () => Promise<void> | void, serverPid?: number): Promise<Sample> {
  const meter = startCpuMeter(serverPid ? [serverPid] : []);
  await fn();
  const c = meter();
  return { seconds: c.seconds, cpu: serverPid ? c.serverSeconds : c.clientSeconds, foreign: c.foreignPct, steal: c.stealPct };
}
