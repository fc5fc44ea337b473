/**
 * Reconnect delays: exponential with full jitter (a uniformly random wait between 0 and
 * min(maxMs, baseMs × 2^attempt)), so a node's viewers do not all come back at once.
 */
export class Backoff {
  private attempt = 0;

  constructor(
    readonly baseMs = 500,
    readonly maxMs = 30_000,
    private readonly random: () => number = Math.random,
  ) {}

  /** The next delay, ms. */
  next(): number {
    const ceiling = Math.min(this.maxMs, this.baseMs * 2 ** Math.min(this.attempt, 30));
    this.attempt++;
    return Math.floor(this.random() * ceiling);
  }

  /** A connection worked: start again from the base. */
  reset(): void {
    this.attempt = 0;
  }

  get attempts(): number {
    return this.attempt;
  }
}
