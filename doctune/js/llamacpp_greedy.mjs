// Greedy answers from llama.cpp itself (node-llama-cpp's prebuilt CPU library), for checking a GGUF
// file written by doctune with a reader that shares no code with it.
// stdin: {"model": PATH, "prompts": [TEXT, ...], "max_tokens": N}   (prompts already chat-templated)
// stdout: {"prompt_tokens": [[id, ...]], "tokens": [[id, ...]], "texts": [TEXT, ...], "seconds": S}
// The package lives in the folder named by DOCTUNE_LLAMACPP (an `npm install --prefix` folder): ES modules
// ignore NODE_PATH, so it is resolved from there by hand.
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const prefix = process.env.DOCTUNE_LLAMACPP;
const resolved = createRequire(`${prefix}/`).resolve("node-llama-cpp");
const { getLlama } = await import(pathToFileURL(resolved).href);

const input = JSON.parse(await new Promise((resolve) => {
  let data = "";
  process.stdin.on("data", (c) => (data += c));
  process.stdin.on("end", () => resolve(data));
}));
const started = Date.now();
// build: "never" — use the shipped binaries or fail; never try to compile or download.
const llama = await getLlama({ gpu: false, build: "never", logLevel: "error" });
const model = await llama.loadModel({ modelPath: input.model });
// threads: llama.cpp spins while it waits for its worker threads; on a busy small machine one thread is faster.
const context = await model.createContext({ contextSize: input.context_size ?? 2048, sequences: 1, threads: input.threads ?? 1 });
const sequence = context.getSequence();
const out = { prompt_tokens: [], tokens: [], texts: [] };
for (const prompt of input.prompts) {
  await sequence.clearHistory();
  // Special tokens in the text (<|im_start|> ...) are parsed as such, as a server would.
  const promptTokens = model.tokenize(prompt, true);
  const generated = [];
  for await (const token of sequence.evaluate(promptTokens, { temperature: 0 })) {
    if (model.isEogToken(token)) break;
    generated.push(token);
    if (generated.length >= input.max_tokens) break;
  }
  out.prompt_tokens.push(promptTokens);
  out.tokens.push(generated);
  out.texts.push(model.detokenize(generated));
}
out.seconds = (Date.now() - started) / 1000;
process.stdout.write(JSON.stringify(out));
await context.dispose();
await model.dispose();
await llama.dispose();
