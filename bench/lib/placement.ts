/**
 * Where servers and clients run. bench-method.md: server on CPU 1, client on CPU 0, printed
 * with the results. PIN=1 (default) splits them, PIN=same puts both on CPU 0, PIN=0 leaves
 * them to the scheduler; numbers from different placements are never compared.
 */
export interface Placement {
  pin: string;
  /** Command prefix pinning a server (`taskset -c 1`), empty when unpinned. */
  server: string[];
  /** Command prefix pinning a client. */
  client: string[];
  describe(): string;
}

export function placement(pin = process.env.PIN ?? '1'): Placement {
  const serverCpu = pin === '0' ? undefined : pin === 'same' ? '0' : '1';
  const clientCpu = pin === '0' ? undefined : '0';
  return {
    pin,
    server: serverCpu ? ['taskset', '-c', serverCpu] : [],
    client: clientCpu ? ['taskset', '-c', clientCpu] : [],
    describe: () => `PIN=${pin} (servers on CPU ${serverCpu ?? 'any'}, clients on CPU ${clientCpu ?? 'any'})`,
  };
}
