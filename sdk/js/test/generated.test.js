// The checked-in protobuf code is what `npm run generate` makes from proto/barrage/v1 now, and
// the demo's script (embedded in the gateway) is what `npm run demo` makes from the sources now.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), "..");

test("src/gen is current with the .proto", () => {
  const out = mkdtempSync(path.join(tmpdir(), "barrage-gen-"));
  try {
    const template = readFileSync(path.join(root, "buf.gen.yaml"), "utf8").replace("out: src/gen", `out: ${out}`);
    writeFileSync(path.join(out, "buf.gen.yaml"), template);
    execFileSync(
      path.join(root, "node_modules/.bin/buf"),
      ["generate", "../../proto", "--template", path.join(out, "buf.gen.yaml"), "--path", "../../proto/barrage/v1/barrage.proto"],
      { cwd: root, env: { ...process.env, PATH: `${path.join(root, "node_modules/.bin")}:${process.env.PATH}` } },
    );
    const file = "barrage/v1/barrage_pb.ts";
    assert.equal(
      readFileSync(path.join(out, file), "utf8"),
      readFileSync(path.join(root, "src/gen", file), "utf8"),
      "run `npm run generate` in sdk/js and commit src/gen",
    );
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test("demo/app.js is current with the SDK and demo/main.ts", () => {
  const out = mkdtempSync(path.join(tmpdir(), "barrage-demo-"));
  try {
    const outfile = path.join(out, "app.js");
    const args = ["demo/main.ts", "--bundle", "--format=esm", "--target=es2022", "--minify", "--legal-comments=none", `--outfile=${outfile}`, "--log-level=error"];
    execFileSync(path.join(root, "node_modules/.bin/esbuild"), args, { cwd: root });
    assert.equal(
      readFileSync(outfile, "utf8"),
      readFileSync(path.join(root, "demo/app.js"), "utf8"),
      "run `npm run demo` in sdk/js and commit demo/app.js",
    );
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
