// llama.cpp's row of bench_llm.py, through node-llama-cpp (npm; its prebuilt CPU binary of
// llama.cpp, so nothing compiles). Reads the same JSON payload as the llama-cpp-python script on
// stdin: {path, threads, reps, ppl_ids, prompt, decode}; prints {ppl, prefill: [], decode: []}.
//   cd DIR && npm install node-llama-cpp   # then: bench_llm.py --llama-node DIR
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";
import path from "node:path";

const dir = process.env.LLAMA_NODE_DIR || process.cwd();
const entry = createRequire(path.join(dir, "package.json")).resolve("node-llama-cpp");
const { getLlama } = await import(pathToFileURL(entry).href);

const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const a = JSON.parse(Buffer.concat(chunks).toString());

const llama = await getLlama({ gpu: false, build: "never" });
const model = await llama.loadModel({ modelPath: a.path });
const context = await model.createContext({ contextSize: 2048, threads: a.threads, batchSize: 512 });
const sequence = context.getSequence();

// perplexity: llama.cpp's probability of each next token (the full softmax, no truncation)
const ids = a.ppl_ids;
const input = ids.slice(0, -1).map((tok) => [tok, {
  generateNext: { probabilities: true, options: { temperature: 1, topK: 0, topP: 1, minP: 0, seed: 0 } },
}]);
const out = await sequence.controlledEvaluate(input);
let nll = 0;
for (let i = 0; i < out.length; i++) nll -= Math.log(out[i].next.probabilities.get(ids[i + 1]) ?? 1e-30);
const result = { ppl: Math.exp(nll / out.length), prefill: [], decode: [], runtime: `node-llama-cpp ${llama.buildType}` };

for (let r = 0; r < a.reps; r++) {
  await sequence.clearHistory();
  let t = performance.now();
  await sequence.evaluateWithoutGeneratingNewTokens(a.prompt);
  result.prefill.push(a.prompt.length / ((performance.now() - t) / 1000));
  // decode: the prompt's first tokens fed one at a time through the KV cache, each step computing
  // the next-token logits and picking one greedily (the work of a generation step)
  t = performance.now();
  for (const tok of a.prompt.slice(0, a.decode)) {
    await sequence.controlledEvaluate([[tok, { generateNext: { token: true, options: { temperature: 0 } } }]]);
  }
  result.decode.push(a.decode / ((performance.now() - t) / 1000));
}
console.log(JSON.stringify(result));
await context.dispose();
await model.dispose();
