// Tokenizer test vectors from llama.cpp (node-llama-cpp 3.22.1, prebuilt CPU): the token ids
// llama.cpp gives for a fixed set of strings, with special-token parsing on and off, no BOS.
// models/tests/tokenizer_llamacpp.rs checks ours against them. From the repository root, with
// the model's absolute path (the catalogue's cached file):
//
//   ../shared/bench/llamacpp-anchor.sh MODEL.gguf 1   # once: installs node-llama-cpp
//   cp scripts/tokenizer-vectors.mjs ~/.cache/tessera-llamacpp-anchor/ && \
//   (cd ~/.cache/tessera-llamacpp-anchor && node tokenizer-vectors.mjs MODEL.gguf) \
//     > models/tests/vectors/ALIAS.tokens.json
//
// e.g. MODEL.gguf = ~/.cache/tessera/models/SmolLM2-135M-Instruct.Q4_1.gguf for ALIAS =
// smollm2-135m-instruct, ~/.cache/tessera/models/gemma-3-270m-q4_k_m.gguf for gemma3-270m.
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
const [modelPath] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath, vocabOnly: true});
const texts = [
  "", " ", "  ", "   ", "Hello world", " Hello world", "Hello world ", "  leading and trailing  ",
  "a  b", "a   \n\n  b", "\t\t", "\n", "\n\n\n", " \n \n", "line one\nline two\r\n\tindented",
  "1234567890", "3.14159", "12 345", "x = 1_000_000 + 42;", "I have 2 cats and 10 dogs.",
  "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{:?}\", v);\n}",
  "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
  "Café naïve résumé Ærøskøbing", "L'Étoile", "Ünïcödé façade jalapeño",
  "你好，世界！我们在北京。", "日本語のテキストです。", "Привет, мир!", "مرحبا بالعالم", "नमस्ते दुनिया",
  "Hello 👋🏽 world 🌍🚀", "👨‍👩‍👧", "I'm don't they'll we've she'd it's",
  "HELLO'S WORLD'LL", "...!!!???", "--- *** ///", "https://example.com/path?q=1&r=two#frag",
  "<div><p>x</p></div>", "   indented code\n\tand tabs   ",
  "The quick brown fox jumps over the lazy dog. ".repeat(8),
  "<|im_start|>user\nHi<|im_end|>\n", "<start_of_turn>user\nHi<end_of_turn>\n", "<bos>text<eos>",
  // Edge cases of the pre-tokenizer, Unicode categories, user-defined tokens and byte fallback.
  "'s 'S don'T x' ' 'll've", "  Hello", "Hello  ", "\n Hello", "a \n", "a\t \nb", "\r\n\r\n",
  "x\u000b\u000cy\u0085z", "a\u00a0b\u3000c\u2009d\u202fe", "e\u0301 n\u0303 a\u0308",
  "\u24d0\u24d1\u24d2 \u216b \u00bd \u0663\u0664\u0665 \u2460\u2461 \u01c4\u01c5 \u02b0\u02b2",
  "\u0378\ue000\u0001\u007f\u200b\u2060", "\ud80c\udc00\ud80c\udc01 \udbff\udffd",
  " ".repeat(100), "a" + " ".repeat(40) + "b", "\n".repeat(40), "\t".repeat(9) + "x",
  "<div>\n\n\n\n    <span>x</span>\t\t\t</div>", "<|im_start|><|im_end|><|im_start",
  "<start_of_turn><end_of_turn><start_of_turn", "<unk> <pad> <mask> [MASK]",
  "abc123def4567 8.9e10 0x1F", "\ud83d\ude42 \ud83d\udc4d\ud83c\udfff\ud83d\udc4d \ud83c\uddfa\ud83c\uddf8",
  "\uc548\ub155\ud558\uc138\uc694 \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35 \u0ba4\u0bae\u0bbf\u0bb4\u0bcd",
  "<s>old</s> new", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
  "<start_of_turn>model\n<end_of_turn><eos>", "<unused0><unused99>", "\u2581already\u2581escaped \u2581",
  "\u0120 \u010a\u0120", "x\u00b2 + y\u00b3 = \u2074", "\ufeffBOM",
];
const cases = [];
for (const text of texts) {
  for (const special of [false, true]) {
    cases.push({text, parse_special: special, ids: Array.from(model.tokenize(text, special)).map(Number)});
  }
}
console.log(JSON.stringify({model: modelPath.split("/").pop(), llama_cpp: "node-llama-cpp 3.22.1", cases}));
process.exit(0);
