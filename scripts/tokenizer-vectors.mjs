// Tokenizer test vectors from llama.cpp (node-llama-cpp 3.22.1, prebuilt CPU): the token ids
// llama.cpp gives for a fixed set of strings, with special-token parsing on and off, no BOS.
//
//   ../shared/bench/llamacpp-anchor.sh MODEL.gguf 1   # once: installs node-llama-cpp
//   cp scripts/tokenizer-vectors.mjs ~/.cache/tessera-llamacpp-anchor/ && \
//   (cd ~/.cache/tessera-llamacpp-anchor && node tokenizer-vectors.mjs MODEL.gguf) \
//     > models/tests/vectors/ALIAS.tokens.json
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
];
const cases = [];
for (const text of texts) {
  for (const special of [false, true]) {
    cases.push({text, parse_special: special, ids: Array.from(model.tokenize(text, special)).map(Number)});
  }
}
console.log(JSON.stringify({model: modelPath.split("/").pop(), llama_cpp: "node-llama-cpp 3.22.1", cases}));
process.exit(0);
