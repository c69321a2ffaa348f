// Compiles contracts/src/*.sol with the pinned solc (npm package `solc`, see package.json)
// into contracts/artifacts/<Name>.json, deterministically: fixed source names, sorted
// inputs, no metadata hash in the bytecode, stable JSON. `node compile.mjs --out DIR`
// writes elsewhere (the reproducibility test compares DIR with the committed artifacts).
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
let solc;
try {
  solc = require('solc');
} catch {
  console.error('solc is not installed: run scripts/contracts.sh (npm ci in contracts/)');
  process.exit(2);
}

const PINNED = '0.8.37';
const version = solc.version();
if (!version.startsWith(PINNED + '+')) {
  console.error(`solc ${version} found, ${PINNED} pinned: run scripts/contracts.sh`);
  process.exit(2);
}

const outArg = process.argv.indexOf('--out');
const out = outArg > 0 ? path.resolve(process.argv[outArg + 1]) : path.join(here, 'artifacts');
const srcDir = path.join(here, 'src');
const files = fs.readdirSync(srcDir).filter((f) => f.endsWith('.sol')).sort();
const sources = {};
for (const f of files) sources[`src/${f}`] = { content: fs.readFileSync(path.join(srcDir, f), 'utf8') };

export const settings = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: 'prague',
  viaIR: false,
  metadata: { bytecodeHash: 'none', appendCBOR: false },
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
};

const output = JSON.parse(solc.compile(JSON.stringify({ language: 'Solidity', sources, settings })));
const errors = (output.errors || []).filter((e) => e.severity === 'error');
for (const e of output.errors || []) console.error(e.formattedMessage);
if (errors.length > 0 || (output.errors || []).length > 0) {
  console.error(errors.length > 0 ? 'compilation failed' : 'warnings are errors here');
  process.exit(1);
}

fs.mkdirSync(out, { recursive: true });
for (const file of Object.keys(output.contracts).sort()) {
  for (const name of Object.keys(output.contracts[file]).sort()) {
    const c = output.contracts[file][name];
    // Interfaces and internal-only libraries have nothing to deploy or call.
    if (!c.evm.bytecode.object || !c.abi.some((x) => x.type === 'function')) continue;
    const artifact = {
      contractName: name,
      sourceName: file,
      compiler: { version, settings: { ...settings, outputSelection: undefined } },
      abi: c.abi,
      bytecode: '0x' + c.evm.bytecode.object,
      deployedBytecode: '0x' + c.evm.deployedBytecode.object,
    };
    fs.writeFileSync(path.join(out, `${name}.json`), JSON.stringify(artifact, null, 2) + '\n');
    console.log(`${name}: ${c.evm.deployedBytecode.object.length / 2} bytes runtime`);
  }
}
