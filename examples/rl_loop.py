"""An RL-shaped loop: generate rollouts, update the policy, refit the engine, generate again.

The policy (a transformers Llama) trains in eager PyTorch; a CompiledLM made from it once
serves the rollouts. After each update a Refitter copies the new weights into the engine
(no recompile), and the rollouts that follow come from the new policy: each round checks
the engine's greedy tokens against transformers' generate on the trainer's weights.

    python examples/rl_loop.py            # a tiny policy on the CPU (float32), seconds
    python examples/rl_loop.py --gpu      # the Llama-3.2-1B-shaped policy, bfloat16, on CUDA
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import torchrefit


def policy(gpu: bool) -> transformers.LlamaForCausalLM:
    if gpu:
        config = transformers.LlamaConfig(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
            tie_word_embeddings=True, rope_theta=500000.0,
        )  # fmt: skip
    else:
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, initializer_range=0.2,
        )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if gpu else "cpu"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to(torch.bfloat16 if gpu else torch.float32).eval()
    model.generation_config.eos_token_id = None  # random weights: full-length rollouts
    return model


def update(model: torch.nn.Module, rollouts: torch.Tensor, lr: float) -> float:
    """One policy-gradient-shaped step: raise the likelihood of the sampled rollouts."""
    model.train()
    logits = model(rollouts).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), rollouts[:, 1:].reshape(-1)
    )
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None
    model.eval()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    batch, prompt, new = (32, 32, 256) if args.gpu else (4, 8, 24)
    trainer = policy(args.gpu)
    started = time.perf_counter()
    engine = torchrefit.compile_lm(trainer, max_batch_size=batch, max_seq_len=prompt + new)
    print(f"compile_lm: {time.perf_counter() - started:.1f} s")
    refit = torchrefit.Refitter(engine, trainer)  # binds the trainer's tensors once
    vocab = trainer.config.vocab_size
    prompts = torch.randint(0, vocab, (batch, prompt), device=device)
    generator = torch.Generator(device).manual_seed(0)
    for round in range(args.rounds):
        started = time.perf_counter()
        rollouts = engine.generate(
            prompts, max_new_tokens=new, do_sample=True, top_k=50, generator=generator
        )
        generated = time.perf_counter() - started
        loss = update(trainer, rollouts, lr=1e-2 if not args.gpu else 1e-4)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        refit()  # the new policy into the engine: a copy, no compile
        if device == "cuda":
            torch.cuda.synchronize()
        refitted = time.perf_counter() - started
        check = prompts[:2, :]
        want = trainer.generate(check, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        same = torch.equal(engine.generate(check, max_new_tokens=8), want)
        print(
            f"round {round}: generate {1e3 * generated:.0f} ms ({batch}x{new} tokens), "
            f"loss {loss:.3f}, refit {1e3 * refitted:.2f} ms, "
            f"greedy tokens equal the trained policy's: {same}"
        )
        if not args.gpu:  # float32: exact; bfloat16 near-ties may part tokens
            assert same


if __name__ == "__main__":
    main()
