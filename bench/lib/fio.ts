/**
 * The one external client (bench-method.md §1): fio's nbd engine (libnbd) against an NBD
 * socket, time-based with a 1 s ramp, JSON output, wrapped in a hard timeout.
 */
import { nbdUri, run } from './processes';

export interface FioNbdJob {
  rw: 'read' | 'randread' | 'write' | 'randwrite';
  bs: string;
  iodepth: number;
  /** Bytes of the export fio may address (`--size`), e.g. '1G' or a number. */
  size: string | number;
  runtime: number;
  ramp?: number;
}

export interface FioSide {
  iops: number;
  bw_bytes: number;
  io_bytes: number;
  total_ios: number;
  lat_ns: { mean: number };
}

/** Parses fio's JSON (the nbd engine may print a line before it) into the first job. */
export function parseFioJob(out: string): { read: FioSide; write: FioSide; usr_cpu: number; sys_cpu: number } {
  return JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
}

/** Runs one fio nbd job, pinned with `clientPrefix`, and returns the side (read or write) it measured. */
export function fioNbd(socket: string, job: FioNbdJob, clientPrefix: string[] = []): FioSide {
  const args = [
    ...clientPrefix, 'fio', '--name=bench', '--ioengine=nbd', `--uri=${nbdUri(socket)}`, `--rw=${job.rw}`, `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`, '--thread', '--norandommap', '--randrepeat=0', '--group_reporting', '--time_based',
    `--runtime=${job.runtime}`, `--ramp_time=${job.ramp ?? 1}`, `--size=${job.size}`, '--output-format=json',
  ];
  const parsed = parseFioJob(run(['timeout', '-s', 'KILL', String(job.runtime + 60), ...args], job.runtime + 90));
  return job.rw.includes('write') ? parsed.write : parsed.read;
}
