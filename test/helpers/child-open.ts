/** Runs test/helpers/open-child.js with a timeout and parses its answer. */
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import type { OpenOptions } from '../../core';

export interface ChildResult {
  ok: boolean;
  error?: { name: string; typed: boolean; code?: string; message: string; field?: string; limit?: string };
  maxRssKiB: number;
}

const CHILD = path.join(__dirname, 'open-child.js');

export function openInChild(spec: string, options: OpenOptions = {}, readBytes = 0, timeoutMs = 120_000): Promise<ChildResult> {
  return new Promise((resolve, reject) => {
    execFile(process.execPath, [CHILD, JSON.stringify({ spec, options, readBytes })], { timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 1 << 20 }, (error, stdout, stderr) => {
      const line = stdout.trim().split('\n').pop() ?? '';
      try {
        resolve(JSON.parse(line) as ChildResult);
      } catch {
        reject(new Error(`open child failed (${error?.message ?? 'no output'}): ${stderr}`));
      }
    });
  });
}
