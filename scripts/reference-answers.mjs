// Greedy reference answers from llama.cpp (node-llama-cpp 3.22.1, prebuilt CPU) for the
// real-model tests: the same GGUF and the same rendered prompt text, 1 thread.
//
//   cp scripts/reference-answers.mjs ~/.cache/tessera-llamacpp-anchor/ && \
//   (cd ~/.cache/tessera-llamacpp-anchor && node reference-answers.mjs MODEL.gguf chatml|raw) \
//     > models/tests/vectors/ALIAS.answers.json
//
// (run ../shared/bench/llamacpp-anchor.sh once first: it installs node-llama-cpp there.)
// "chatml" renders each question with SmolLM2's chat template (the GGUF's own, which adds
// SmolLM's default system prompt); "raw" sends the text after BOS, for the gemma3 base model.
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
const [modelPath, mode] = process.argv.slice(2);
const N = 32;
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
const ctx = await model.createContext({contextSize: 512, threads: 1});
const chat = ["Name the capital of France.", "What is the capital of France?", "Which planet is known as the Red Planet?", "What is 2 + 2?", "Name three colors."];
const raw = ["The three primary colors are", "Water boils at a temperature of", "The largest ocean on Earth is the", "What is the capital of France?"];
const render = (q) => "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n" + q + "<|im_end|>\n<|im_start|>assistant\n";
const cases = [];
for (const q of mode === "chatml" ? chat : raw) {
  const text = mode === "chatml" ? render(q) : q;
  let ids = model.tokenize(text, true);
  if (mode !== "chatml" && model.tokens.bos != null) ids = [model.tokens.bos, ...ids];
  const seq = ctx.getSequence();
  const out = [];
  for await (const tok of seq.evaluate(ids, {temperature: 0})) {
    if (model.isEogToken(tok)) break;
    out.push(tok);
    if (out.length >= N) break;
  }
  seq.dispose();
  cases.push({question: q, prompt: text, prompt_ids: ids.map(Number), output_ids: out.map(Number), output_text: model.detokenize(out)});
}
console.log(JSON.stringify({model: modelPath.split("/").pop(), llama_cpp: "node-llama-cpp 3.22.1", threads: 1, max_tokens: N, mode, cases}, null, 1));
process.exit(0);
