// Encodes a UTF-8 text file with a reference tokenizer and prints the ids as one JSON array.
//   node encode_reference.cjs tiktoken:<gpt2|cl100k_base|o200k_base> FILE   (tiktoken WASM, encode_ordinary)
//   node encode_reference.cjs hf:<tokenizer.json> FILE                       (@lenml/tokenizers = transformers.js)
//   node encode_reference.cjs bench:<gpt2|cl100k_base|o200k_base> FILE       (prints MB/s of tiktoken)
// Module paths come from NODE_PATH (.deps/npm/node_modules).
const fs = require("fs");
const [kind, file] = process.argv.slice(2);
const text = fs.readFileSync(file, "utf8");
const [family, name] = kind.split(/:(.*)/s);
if (family === "tiktoken" || family === "bench") {
  const { get_encoding } = require("tiktoken");
  const enc = get_encoding(name);
  if (family === "bench") {
    enc.encode_ordinary(text.slice(0, 100000));  // warm up
    const t0 = process.hrtime.bigint();
    const ids = enc.encode_ordinary(text);
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    console.log(JSON.stringify({ mb_per_s: Buffer.byteLength(text) / 1e6 / s, tokens: ids.length, seconds: s }));
  } else {
    process.stdout.write(JSON.stringify(Array.from(enc.encode_ordinary(text))) + "\n");
  }
  enc.free();
} else if (family === "hf") {
  const { TokenizerLoader } = require("@lenml/tokenizers");
  const json = JSON.parse(fs.readFileSync(name, "utf8"));
  const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON: json, tokenizerConfig: {} });
  process.stdout.write(JSON.stringify(tok.encode(text, { add_special_tokens: false })) + "\n");
} else {
  console.error("unknown reference " + kind);
  process.exit(2);
}
