"""Build the "own words" evaluation set of the router (src/dlplora/plugin/own_words.jsonl; docs/plugin.md).

Prompts of the 26 tasks written as a user writes them, from sources the router's training never sees:

- ``bigbench-unsampled``: BIG-bench examples (the ``bigbench==1.0.0`` sdist, as `dlp-lora data prepare` reads it) that
  `dlplora.tasks.split_examples` does not sample (tasks with more than 1,000 examples);
- ``gsm8k-train``: GSM8K's *train* split (openai/grade-school-math@3101c7d, grade_school_math/data/train.jsonl; the
  prepared gsm8k task samples the *test* split only);
- ``test-split``: for tasks with no unused source examples (abstract_narrative_understanding, object_counting,
  alpaca, cnn_dailymail, news_commentary_*), the prepared *test* split, which the router never trains on.

Every input is rewritten by rules (:data:`ASKS`: a request in plain words per task, options written as a user lists
them, or the input alone with BIG-bench's field labels dropped) -- never the BIG-bench rendering. Inputs equal to any
training input of any task (whitespace-normalised, lower-cased) and repeated inputs are left out.

    PYTHONPATH=src python scripts/build_own_words.py /work/data /path/to/grade-school-math/train.jsonl /work/shared/data/extra
"""
import hashlib
import json
import random
import re
import sys

from dlplora.tasks import SAMPLE_SIZE, SPLIT_SEED, TASKS, load_examples, load_split

PER_TASK = 30
OUT = "src/dlplora/plugin/own_words.jsonl"

# {x}: the input (labels dropped), {o}: the options as a user lists them ("" for generative tasks)
ASKS = {
    "abstract_narrative_understanding": ["Which proverb fits this story best?\n{x}{o}", "{x}\n\nwhat saying does this little story illustrate?{o}",
                                         "Here's a short story. Pick the proverb that matches it.\n{x}{o}"],
    "contextual_parametric_knowledge_conflicts": ["{x}\nGoing only by that text, what's the answer?{o}", "Answer from the passage, even if it sounds wrong: {x}{o}",
                                                  "{x}{o}"],
    "cs_algorithms": ["{x}\nis this balanced / what's the LCS length?{o}", "Quick algorithms question about: {x}{o}", "{x}{o}"],
    "disfl_qa": ["{x}", "Can you answer this (sorry, I mixed up my words): {x}", "{x}\nanswer using the text above"],
    "elementary_math_qa": ["{x}{o}", "Help me with this math problem: {x}{o}", "{x}\nwhat's the answer?{o}"],
    "epistemic_reasoning": ["{x}\nDoes the first sentence entail the second?{o}", "Does this follow? {x}{o}", "{x}{o}"],
    "formal_fallacies_syllogisms_negation": ["Is this argument logically valid? {x}{o}", "{x}\nvalid or not?{o}", "{x}{o}"],
    "language_identification": ["What language is this? {x}{o}", "{x}\n\nwhich language is that sentence in?{o}", "{x}{o}"],
    "linguistics_puzzles": ["Can you solve this translation puzzle?\n{x}", "{x}", "Figure out the pattern and translate:\n{x}"],
    "logical_deduction": ["{x}{o}", "Logic puzzle: {x}{o}", "{x}\nWhich statement is true?{o}"],
    "object_counting": ["{x}", "quick question: {x}", "{x} Just give me the number."],
    "play_dialog_same_or_different": ["{x}\nIs that one speaker or two?{o}", "In this Shakespeare bit, are the lines spoken by the same person? {x}{o}", "{x}{o}"],
    "question_selection": ["{x}\nWhich question does that answer go with?{o}", "Pick the right question for this answer: {x}{o}", "{x}{o}"],
    "reasoning_about_colored_objects": ["{x}{o}", "Help me with this one: {x}{o}", "{x}\nanswer please{o}"],
    "strategyqa": ["{x}", "{x} Explain briefly.", "Yes or no, and why: {x}"],
    "topical_chat": ["Continue this chat: {x}", "{x}", "What would you say next in this conversation?\n{x}"],
    "tracking_shuffled_objects": ["{x}{o}", "Brain teaser: {x}{o}", "{x}\nwho ends up with what?{o}"],
    "unit_conversion": ["{x}{o}", "Convert: {x}{o}", "{x}?{o}"],
    "vitaminc_fact_verification": ["{x}\nIs the claim supported by the text?{o}", "Fact check this against the passage: {x}{o}", "{x}{o}"],
    "winowhy": ["{x}\nIs that explanation right?{o}", "Does this reasoning about the pronoun make sense? {x}{o}", "{x}{o}"],
    "gsm8k": ["{x}", "Can you help me solve this? {x}", "{x} Show your work."],
    "cnn_dailymail": ["{x}", "tl;dr this article please:\n{x}", "{x}\n\nWhat are the main points?"],
    "news_commentary_de": ["{x}", "Was heißt das auf Englisch? {x}", "{x}\nin English please"],
    "news_commentary_es": ["{x}", "¿Cómo se dice en inglés? {x}", "{x}\nin English please"],
    "news_commentary_it": ["{x}", "Come si dice in inglese? {x}", "{x}\nin English please"],
    "alpaca": ["{x}", "Hey, {x}", "{x} Thanks!"],
}
LABEL = re.compile(r"^\s*(Question|Context|Q|Premise|Hypothesis|Sentence|Passage|Claim|Short Answer|Strings|Sequence|"
                   r"Narrative|Dialogue)\s*:\s*", re.M)


def norm(s: str) -> str:
    return " ".join(s.split()).lower()


def options(choices, rng):
    if not choices or rng.random() < 0.5:
        return ""
    style = rng.randrange(3)
    if style == 0:
        return "\nOptions: " + ", ".join(choices)
    if style == 1:
        return "\n" + " ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
    return " (" + " or ".join(choices) + ")"


def digest(s: str) -> str:
    return hashlib.sha1(norm(s).encode()).hexdigest()[:16]


def write(task, ex, source, rng, out, n_source=None):
    if digest(ex["input"]) in {r["input_sha1"] for r in out}:  # the same input twice in a source
        return
    x = LABEL.sub("", ex["input"]).strip()
    x = re.sub(r"\n\s*\n+", "\n", x)
    tpl = rng.choice(ASKS[task])
    text = tpl.format(x=x, o=options(ex.get("choices"), rng)).strip()
    row = {"task": task, "text": text, "source": source, "input_sha1": digest(ex["input"])}
    out.append(row if n_source is None else row | {"n_source": n_source})


def main(data, gsm8k_train, data_extra):
    train_inputs = {digest(r["input"]) for t in TASKS for r in load_split(data, t, "train")}
    rng = random.Random(29)
    out = []
    for task, spec in TASKS.items():
        before = len(out)
        if spec.source == "bigbench" and len(rows := load_examples(task)) > SAMPLE_SIZE:
            sampled = set(random.Random(SPLIT_SEED).sample(range(len(rows)), SAMPLE_SIZE))
            unused = [i for i in range(len(rows)) if i not in sampled and digest(rows[i]["input"]) not in train_inputs]
            for i in rng.sample(unused, min(PER_TASK, len(unused))):
                write(task, rows[i], f"bigbench-unsampled:{task}#{i}", rng, out, len(rows))
        elif task == "gsm8k":
            rows = [json.loads(line) for line in open(gsm8k_train, encoding="utf-8")]
            for i in rng.sample(range(len(rows)), PER_TASK):
                if digest(rows[i]["question"]) not in train_inputs:
                    write(task, {"input": rows[i]["question"]}, f"gsm8k-train:openai/grade-school-math@3101c7d "
                          f"grade_school_math/data/train.jsonl line {i + 1}", rng, out)
        else:
            n_source = len(load_examples(task, data_extra))
            rows = [r for r in load_split(data, task, "test") if digest(r["input"]) not in train_inputs]
            for r in rng.sample(rows, min(PER_TASK, len(rows))):
                write(task, r, f"test-split:{r['id']}", rng, out, n_source)
        print(task, len(out) - before)  # noqa: T201
    with open(OUT, "w", encoding="utf-8") as fh:
        for r in out:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(len(out), "prompts ->", OUT)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
