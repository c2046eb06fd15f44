"""Self-verification (RISE, TOPR's generative verifier): verification prompts built from a
solution, the verification reward on hand-labelled cases, the evenly spread down-sampling, the
embedded model's check format, and the mixed batch (solutions + verifications) keeping each task's
rows and metrics apart."""

import numpy as np
import pytest
import transformers

from offpolicy_jax import rewards, verification
from offpolicy_jax.data import arith, tokenizer as char_tokenizer
from offpolicy_jax.training import batch as batch_lib
from offpolicy_jax.training import stages, trainer
from offpolicy_jax.training.batch import Rollouts
from offpolicy_jax.training.config import RunConfig

SOLUTION = "7*3=21, 12+21=33. \\boxed{33}"
RECORD = {"id": "arith-train-0", "prompt": "Q: 12+7*3\nA: ", "gold": "33"}


# ---------------------------------------------------------------------------------------------
# Verification prompts.


def test_compact_prompt_is_the_solving_prompt_the_solution_and_the_cue():
    prompt = verification.verification_prompt(RECORD, SOLUTION, template="compact")
    assert prompt == "Q: 12+7*3\nA: 7*3=21, 12+21=33. \\boxed{33}\nC: "


def test_paper_prompt_quotes_question_and_solution_in_the_rise_template(tmp_path):
    record = {"prompt": "Question: What is 2+2?\n...\nAnswer:", "question": "What is 2+2?",
              "gold": "4"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        char_tokenizer.build_char_tokenizer(tmp_path))
    # No chat template: the system prompt, the filled template, then the answer cue.
    plain = verification.verification_prompt(record, "2+2=4. \\boxed{4}", tokenizer=tokenizer)
    user = verification.PAPER_TEMPLATE.replace(
        "__special_original_question__", "What is 2+2?").replace(
        "__special_original_response__", "2+2=4. \\boxed{4}")
    assert plain == f"{verification.PAPER_SYSTEM_PROMPT}\n\n{user}\nAnswer:"
    assert "### Question Begin ###\nWhat is 2+2?\n### Question End ###" in plain
    assert "### Response Begin ###\n2+2=4. \\boxed{4}\n### Response End ###" in plain
    assert "assign \\boxed{-0.5}" in plain and plain.count("\\boxed{") == 9   # system 1, criteria 6, solution 1, closing 1
    # A chat template: a system turn, the user turn, the generation prompt.
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = verification.verification_prompt(record, "2+2=4. \\boxed{4}", tokenizer=tokenizer)
    assert chat == f"<system>{verification.PAPER_SYSTEM_PROMPT}\n<user>{user}\n<assistant>"
    # A template that refuses a system turn gets the system prompt in front of the user's.
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('no system role') }}{% endif %}"
                               "<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>")
    folded = verification.verification_prompt(record, "2+2=4. \\boxed{4}", tokenizer=tokenizer)
    assert folded == f"<user>{verification.PAPER_SYSTEM_PROMPT}\n\n{user}\n<assistant>"
    # Without a question field the prompt text stands for the problem.
    del record["question"]
    assert "### Question Begin ###\nQuestion: What is 2+2?" in verification.verification_prompt(
        record, "x", tokenizer=None)
    with pytest.raises(ValueError, match="unknown verification template"):
        verification.verification_prompt(record, "x", template="short")


def test_benchmark_records_keep_the_question_for_the_verification_prompt():
    from offpolicy_jax.data import prompts
    records = prompts.to_prompt_records([{"id": "a", "question": "What is 2+2?", "gold": "4"}])
    assert records[0]["question"] == "What is 2+2?"
    assert records[0]["prompt"].startswith("Question: What is 2+2?")


# ---------------------------------------------------------------------------------------------
# Outcomes and the verification reward, on hand-labelled cases.

# (response, gold, outcome): the solution reward's cases and the verification reward's (the gold
# is then the rated solution's true rating).
LABELLED = [
    ("7*3=21, 12+21=33. \\boxed{33}", "33", "correct"),
    ("7*3=21, 12+21=34. \\boxed{34}", "33", "wrong"),
    ("7*3=21, 12+2", "33", "no_answer"),
    # Verifications: the rating matches the solution's, does not, or is missing.
    ("7*3=21 ok, 12+21=33 ok. \\boxed{1}", "1", "correct"),
    ("7*3=21 ok, 12+21=33 no. \\boxed{-0.5}", "-0.5", "correct"),
    ("no answer. \\boxed{-1}", "-1", "correct"),
    ("7*3=21 ok, 12+21=33 ok. \\boxed{1}", "-0.5", "wrong"),       # called a wrong one right
    ("7*3=21 ok, 12+21=34 no. \\boxed{-0.5}", "1", "wrong"),       # called a right one wrong
    ("no answer. \\boxed{-1}", "1", "wrong"),
    ("7*3=21 ok, 12+21=33 ok.", "1", "no_answer"),                 # no rating
    ("The rating is \\boxed{1.0}", "1", "correct"),                # the same value, other text
    ("\\boxed{-1/2}", "-0.5", "correct"),
]


def test_outcome_reward_on_hand_labelled_cases():
    fn = verification.make_outcome_reward()
    responses = [r for r, _, _ in LABELLED]
    records = [{"gold": g} for _, g, _ in LABELLED]
    with rewards.VerifierPool() as pool:
        got = fn(records, responses, pool)
    want = verification.OutcomeReward().values([o for _, _, o in LABELLED])
    np.testing.assert_array_equal(got, want)
    assert verification.OutcomeReward().outcomes(got) == [o for _, _, o in LABELLED]
    np.testing.assert_array_equal(want[:3], [1.0, -0.5, -1.0])     # the paper's values


def test_outcome_rewards_must_be_distinct_and_known():
    with pytest.raises(ValueError, match="must differ"):
        verification.OutcomeReward(correct=1.0, wrong=0.0, no_answer=0.0)
    custom = verification.OutcomeReward(correct=2.0, wrong=0.0, no_answer=-3.0)
    assert custom.outcomes(custom.values(["wrong", "correct", "no_answer"])) == \
        ["wrong", "correct", "no_answer"]
    with pytest.raises(ValueError, match="none of"):
        custom.outcomes([0.5])


def test_verification_metrics_split_by_the_rated_solutions_outcome():
    outcomes = ["correct", "correct", "wrong", "wrong", "wrong", "no_answer"]
    accurate = [True, False, True, True, False, True]
    metrics = verification.verification_metrics(outcomes, accurate,
                                                said_correct=[1, 0, 0, 0, 1, 0])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["accuracy_correct"] == 0.5
    assert metrics["accuracy_wrong"] == pytest.approx(2 / 3)
    assert metrics["accuracy_no_answer"] == 1.0
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert metrics["solutions_correct"] == pytest.approx(2 / 6)
    assert metrics["said_correct"] == pytest.approx(2 / 6)
    assert verification.verification_metrics(["wrong"], [True])["accuracy_correct"] is None


# ---------------------------------------------------------------------------------------------
# Down-sampling.


@pytest.mark.parametrize("num_groups,group_size,total", [(4, 8, 2), (4, 8, 4), (4, 8, 6),
                                                          (3, 4, 12), (5, 2, 0)])
def test_spread_rows_takes_evenly_from_the_groups(num_groups, group_size, total):
    rows = verification.spread_rows(num_groups, group_size, total, np.random.default_rng(0))
    assert len(rows) == len(set(rows.tolist())) == total
    assert np.all(np.diff(rows) > 0) if total > 1 else True       # row order kept
    per_group = np.bincount(rows // group_size, minlength=num_groups)
    base, extra = divmod(total, num_groups)
    np.testing.assert_array_equal(per_group, [base + (g < extra) for g in range(num_groups)])
    with pytest.raises(ValueError, match="cannot pick"):
        verification.spread_rows(num_groups, group_size, num_groups * group_size + 1,
                                 np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# The embedded model's check format.


@pytest.mark.parametrize("expression,solution,check", [
    ("12+7*3", "7*3=21, 12+21=33. \\boxed{33}", "7*3=21 21 ok, 12+21=33 33 ok. \\boxed{1}"),
    ("12+7*3", "7*3=21, 12+21=34. \\boxed{34}", "7*3=21 21 ok, 12+21=34 33 no. \\boxed{-0.5}"),
    # The check stops at the first slip.
    ("12+7*3", "7*3=22, 12+22=34. \\boxed{34}", "7*3=22 21 no. \\boxed{-0.5}"),
    ("3-9*2", "9*2=18, 3-18=-15. \\boxed{-15}", "9*2=18 18 ok, 3-18=-15 -15 ok. \\boxed{1}"),
    ("12+7*3", "7*3=21, 12+21=33. \\boxed{30}",
     "7*3=21 21 ok, 12+21=33 33 ok, box 30 no. \\boxed{-0.5}"),
    ("12+7*3", "7*3=21, 12+2", "no answer. \\boxed{-1}"),
])
def test_checked_response_confirms_each_step_and_rates_the_solution(expression, solution, check):
    assert arith.checked_response(solution) == check
    # Without checker slips the rating is the solution's true one.
    answer = rewards.extract_answer(solution)
    truth = ("-1" if answer is None else
             "1" if answer == arith.parse_expression(expression).gold else "-0.5")
    assert rewards.extract_answer(check) == truth


def test_verification_demonstrations_rate_their_solutions_with_slips_in_the_checks():
    pairs = arith.verification_demonstrations(3000, seed=2, solution_slip_probability=0.25,
                                              check_slip_probability=0.1,
                                              no_answer_fraction=0.05)
    ratings, truths = [], []
    for prompt, check in pairs:
        assert prompt.startswith("Q: ") and prompt.endswith(arith.VERIFY_CUE)
        expression = prompt[3:prompt.index("\n")]
        solution = prompt[prompt.index("\nA: ") + 4:-len(arith.VERIFY_CUE)]
        answer = rewards.extract_answer(solution)
        truth = ("-1" if answer is None else
                 "1" if answer == arith.parse_expression(expression).gold else "-0.5")
        ratings.append(rewards.extract_answer(check))
        truths.append(truth)
        assert arith.checked_response(solution).endswith("}")
    ratings, truths = np.array(ratings), np.array(truths)
    assert 0.4 < np.mean(truths == "1") < 0.6          # about half the solutions are right
    assert 0.03 < np.mean(truths == "-1") < 0.07
    np.testing.assert_array_equal(ratings[truths == "-1"], "-1")
    # The checker slips: some right solutions are called wrong, almost never the reverse.
    assert 0.1 < np.mean(ratings[truths == "1"] == "-0.5") < 0.35
    assert np.mean(ratings[truths == "-0.5"] == "1") < 0.05
    assert max(len(c) for _, c in pairs) <= 64


# ---------------------------------------------------------------------------------------------
# The mixed batch.


class TextSampler:
    """Stands in for ``stages.RolloutSampler``: a character tokenizer's ids of fixed texts.

    Solutions of prompt ``q`` (record ``id`` i) are ``SOLUTIONS[i][j]``; a verification of a
    solution is ``"ok. \\boxed{1}"`` when its prompt holds an even solution index, else
    ``"no. \\boxed{-0.5}"``, so which verification is right is known in advance."""

    pad_id = 0

    def __init__(self, config, solutions):
        self.config = config
        self.solutions = solutions
        self.generated = 0
        self.reward_fn = verification.make_outcome_reward()
        self.calls = []

    def encode(self, text):
        return [ord(c) for c in text]

    class Tokenizer:
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            del skip_special_tokens
            return "".join(chr(i) for i in ids)

    tokenizer = Tokenizer()

    def decode(self, rollouts, rows):
        return stages.RolloutSampler.decode(self, rollouts, rows)

    def sample(self, params, records, seed_index, policy_version, *, reward_fn=None,
               task=batch_lib.SOLVE):
        del params
        group_size = self.config.group_size
        self.calls.append((seed_index, task, [r["prompt"] for r in records]))
        texts, prompts, golds = [], [], []
        for record in records:
            for j in range(group_size):
                if task == batch_lib.SOLVE:
                    texts.append(self.solutions[record["id"]][j])
                else:
                    solution = record["prompt"].split("\nA: ")[1]
                    texts.append("ok. \\boxed{1}" if "even" in solution else "no. \\boxed{-0.5}")
                prompts.append(self.encode(record["prompt"]))
                golds.append(record)
        width = 48
        tokens = np.zeros((len(texts), width), np.int32)
        for row, text in enumerate(texts):
            tokens[row, :len(text)] = self.encode(text)
        self.generated += len(texts)
        with rewards.VerifierPool() as pool:
            scores = (reward_fn or self.reward_fn)(golds, texts, pool)
        prompt_array, prompt_lengths = batch_lib.prompts_to_array(prompts, self.pad_id)
        return Rollouts(prompt_tokens=prompt_array, prompt_lengths=prompt_lengths,
                        tokens=tokens, lengths=np.array([len(t) for t in texts], np.int32),
                        behaviour_logp=np.full(tokens.shape, -0.5, np.float32),
                        rewards=np.asarray(scores, np.float32),
                        group_index=np.repeat(np.arange(len(records)), group_size).astype(
                            np.int32),
                        policy_version=np.full(len(texts), policy_version, np.int32),
                        task=np.full(len(texts), task, np.int32))


class ListSelection(stages.PromptStream):
    """The first records, every iteration."""

    def __init__(self, records):
        super().__init__()
        self.records = records

    def bind(self, records, config):
        del config
        self.records = records

    def state_dict(self):
        return {}, {}

    def select(self, num_prompts, iteration):
        del iteration
        return self.records[:num_prompts]


def test_mixed_batch_keeps_each_tasks_rows_and_metrics_apart():
    """2 problems x 4 solutions; 4 verified (2 per group). Solutions labelled "even" are the
    right ones; the fake verifier says "right" exactly for those, except that the rated-wrong
    case of problem 1 is mislabelled on purpose so that one verification is inaccurate."""
    config = RunConfig(workdir="unused", batch_size=2, group_size=4, seed=3)
    records = [{"id": 0, "prompt": "Q: 1+1\nA: ", "gold": "2"},
               {"id": 1, "prompt": "Q: 2+3\nA: ", "gold": "5"}]
    solutions = {
        0: ["even 1+1=2. \\boxed{2}", "odd 1+1=3. \\boxed{3}", "even 1+1=2. \\boxed{2}",
            "odd 1+1=3. \\boxed{3}"],
        # "even" but wrong: the fake verifier calls it right, an inaccurate verification.
        1: ["even 2+3=6. \\boxed{6}", "odd 2+3=5. \\boxed{5}", "odd 2+3=4. \\boxed{4}",
            "odd 2+3="],
    }
    sampler = TextSampler(config, solutions)
    stage = stages.SelfVerification(4, lambda record, text, tokenizer:
                                    verification.verification_prompt(record, text,
                                                                     template="compact"))
    pipeline = stages.RolloutPipeline(ListSelection(records), sampler, (stage,))
    pipeline.selection.bind(records, config)
    batch = pipeline.collect(params=None, iteration=1)

    # Solutions first (2 groups of 4, task 0, in place), then 4 verification groups (task 1).
    np.testing.assert_array_equal(batch.task, [0] * 8 + [1] * 16)
    np.testing.assert_array_equal(batch.rewards[:8], [1, -0.5, 1, -0.5, -0.5, 1, -0.5, -1])
    np.testing.assert_array_equal(batch.group_index, [0] * 4 + [1] * 4 + np.repeat(
        [2, 3, 4, 5], 4).tolist())
    assert sampler.calls[0][:2] == (1, batch_lib.SOLVE)
    seed_index, task, prompts = sampler.calls[1]
    assert (seed_index, task) == (stages.SelfVerification.SEED_OFFSET + 1, batch_lib.VERIFY)
    # Two solutions of each group, in row order, each quoted after its own problem.
    rows = verification.spread_rows(2, 4, 4, np.random.default_rng([3, 1, 13]))
    want = [verification.verification_prompt(records[r // 4], solutions[r // 4][r % 4],
                                              template="compact") for r in rows]
    assert prompts == want
    # Each verification's reward is its rating against the rated solution's true outcome.
    rated = [("even" in solutions[r // 4][r % 4],
              {1.0: "1", -0.5: "-0.5", -1.0: "-1"}[float(batch.rewards[r])]) for r in rows]
    want_rewards = [1.0 if ("1" if even else "-0.5") == truth else
                    -0.5 for even, truth in rated]
    np.testing.assert_array_equal(batch.rewards[8:], np.repeat(want_rewards, 4))
    # Rows of one task never enter the other task's metrics.
    metrics = pipeline.metrics()
    outcomes = [{"1": "correct", "-0.5": "wrong", "-1": "no_answer"}[t] for _, t in rated]
    accurate = np.array(want_rewards) == 1.0
    assert metrics["verify/accuracy"] == accurate.mean()
    for outcome in ("correct", "wrong"):
        chosen = np.array(outcomes) == outcome
        want_accuracy = accurate[chosen].mean() if chosen.any() else None
        assert metrics[f"verify/accuracy_{outcome}"] == want_accuracy
    assert metrics["verify/solve_accuracy"] == 3 / 8
    assert (metrics["verify/solutions"], metrics["verify/rollouts"],
            metrics["verify/solve_rollouts"]) == (4, 16, 8)
    assert sampler.generated == 24                       # both tasks count as rollouts
    split = trainer.task_metrics(batch)
    assert (split["solve/rows"], split["verify/rows"]) == (8, 16)
    assert split["solve/share"] == pytest.approx(1 / 3)
    assert split["solve/reward_mean"] == pytest.approx(np.mean(batch.rewards[:8]))
    assert split["verify/reward_mean"] == pytest.approx(np.mean(batch.rewards[8:]))
    assert trainer.task_metrics(batch.take(np.arange(8))) == {}   # solving only: nothing added
    # The counters are checkpointed.
    meta, arrays = pipeline.state_dict()
    restored = stages.SelfVerification(4, stage.make_prompt)
    restored.load_state_dict(meta["verify"], {})
    assert (restored.verify_rollouts, restored.solve_rollouts) == (16, 8)


def test_self_verification_must_come_first_and_can_drop_the_solutions():
    config = RunConfig(workdir="unused", batch_size=1, group_size=2)
    records = [{"id": 0, "prompt": "Q: 1+1\nA: ", "gold": "2"}]
    sampler = TextSampler(config, {0: ["even 1+1=2. \\boxed{2}", "odd \\boxed{3}"]})
    def make_prompt(record, text, tokenizer):
        return verification.verification_prompt(record, text, template="compact")

    only = stages.SelfVerification(2, make_prompt, keep_solutions=False)
    pipeline = stages.RolloutPipeline(ListSelection(records), sampler, (only,))
    pipeline.selection.bind(records, config)
    batch = pipeline.collect(params=None, iteration=1)
    np.testing.assert_array_equal(batch.task, [1] * 4)
    late = stages.RolloutPipeline(ListSelection(records), sampler,
                                  (stages.SuccessReplay(), stages.SelfVerification(
                                      2, make_prompt)))
    late.selection.bind(records, config)
    with pytest.raises(ValueError, match="must come first"):
        late.collect(params=None, iteration=1)


def test_rollouts_without_a_task_column_are_solving_rows():
    """Checkpoints and callers from before the task column: every row solves."""
    rows = Rollouts(prompt_tokens=np.ones((2, 1), np.int32), prompt_lengths=np.ones(2, np.int32),
                    tokens=np.ones((2, 3), np.int32), lengths=np.full(2, 3, np.int32),
                    behaviour_logp=np.zeros((2, 3), np.float32), rewards=np.zeros(2, np.float32),
                    group_index=np.zeros(2, np.int32), policy_version=np.zeros(2, np.int32))
    np.testing.assert_array_equal(rows.task, [0, 0])
    old = {k: v for k, v in rows.as_dict().items() if k != "task"}
    np.testing.assert_array_equal(Rollouts.from_dict(old).task, [0, 0])
    mixed = batch_lib.concat([rows, Rollouts(**{**rows.as_dict(), "task": np.ones(2, np.int32)})],
                             pad_id=0)
    np.testing.assert_array_equal(mixed.task, [0, 0, 1, 1])
    np.testing.assert_array_equal(mixed.take_groups([1], 2).task, [1, 1])


@pytest.mark.parametrize("outcomes,total,want_correct", [
    (["correct", "wrong", "wrong", "wrong", "no_answer", "wrong"], 4, 1),   # only one right
    (["correct", "correct", "correct", "wrong", "wrong", "wrong"], 4, 2),
    (["correct", "correct", "correct", "correct", "wrong", "correct"], 4, 3),   # one other
    (["wrong"] * 6, 3, 0),
])
def test_balanced_rows_take_half_correct_as_far_as_the_batch_has_them(outcomes, total,
                                                                      want_correct):
    rows = verification.balanced_rows(outcomes, total, np.random.default_rng(1))
    assert len(set(rows.tolist())) == total and np.all(np.diff(rows) > 0)
    assert sum(outcomes[r] == "correct" for r in rows) == want_correct
