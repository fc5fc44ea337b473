/** A small typed event emitter (no dependency; works in browsers and Node). */
export class Emitter<Events extends { [K in keyof Events]: (...args: any[]) => void }> {
  private handlers: { [K in keyof Events]?: Set<Events[K]> } = {};

  /** Calls `fn` on every `event`; returns a function that stops it. */
  on<K extends keyof Events>(event: K, fn: Events[K]): () => void {
    const set = (this.handlers[event] ??= new Set());
    set.add(fn);
    return () => set.delete(fn);
  }

  protected emit<K extends keyof Events>(event: K, ...args: Parameters<Events[K]>): void {
    for (const fn of this.handlers[event] ?? []) {
      try {
        fn(...args);
      } catch (e) {
        // A throwing listener must not stop the client's own bookkeeping.
        console.error("barrage-client: listener failed", e);
      }
    }
  }
}
