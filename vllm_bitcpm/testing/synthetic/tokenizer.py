"""The synthetic checkpoints' tokenizer, the text it is trained on, and the prompts tests use.

Its own module because the tokenizer is needed without any weights: QAT training
(``vllm_bitcpm.testing.qat_training``) builds one on its own corpus, and tests and benchmarks
use the prompts. The embedded corpus covers the prompts' words, so they tokenize into real
subwords rather than bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

# The prompts of the published accuracy report.
REPORT_PROMPTS: list[str] = [
    "The capital of France is",
    "Einstein is known for",
    "Quantum computing is",
    "The meaning of life is",
    "Machine learning is a",
    "Python is a programming",
    "Natural language processing",
]

# More varied prompts so that tests do not depend on the report's seven.
TEST_PROMPTS: list[str] = [
    "The weather today is cold and",
    "A good teacher always helps students to",
    "The river flows slowly through the old town",
    "In the morning the farmer walks to the field and",
    "Scientists study the stars because",
    "My favourite book tells the story of a",
    "The train to the city leaves at",
    "Computers store information in memory and",
    "Music can make people feel happy when",
    "The small cat sat near the window and watched the",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BOS_TOKEN_ID, EOS_TOKEN_ID = 1, 2
TOKENIZER_VOCAB_TARGET = 1024

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The capital of France is Paris, a city on the river Seine.
Paris is famous for its museums, its cafes and its long history.
The capital of Germany is Berlin and the capital of Italy is Rome.
The capital of Spain is Madrid, and the capital of Japan is Tokyo.
Every country has a capital city where the government meets.
Einstein is known for the theory of relativity.
Einstein is known for his work on light, energy and gravity.
Albert Einstein was a physicist who changed how we think about space and time.
Newton is known for the laws of motion and the theory of gravity.
Marie Curie is known for her research on radioactivity.
Quantum computing is a way of computing that uses quantum bits.
Quantum computing is based on superposition and entanglement.
A quantum computer can solve some problems faster than a classical computer.
Quantum mechanics describes the behaviour of very small particles.
The meaning of life is a question that philosophers have asked for centuries.
The meaning of life is different for every person.
Some people say the meaning of life is to love, to learn and to help others.
Others believe the meaning of life is to find happiness and peace.
Machine learning is a field of computer science that learns from data.
Machine learning is a method for building models from examples.
A machine learning model finds patterns in data and makes predictions.
Deep learning is a kind of machine learning that uses neural networks.
A neural network is made of layers of simple units called neurons.
Python is a programming language that is easy to read and write.
Python is a programming language used for science, web sites and data analysis.
Many programmers like Python because its code is short and clear.
Natural language processing is the study of how computers understand human language.
Natural language processing helps computers translate, summarize and answer questions.
Natural language processing uses machine learning to model words and sentences.
A language model predicts the next word in a sentence.
The weather today is cold and windy, so wear a warm coat.
The weather in summer is hot and the days are long.
In winter the nights are long and the weather is often cold.
Rain falls from the clouds and fills the rivers and lakes.
A good teacher always helps students to learn and to ask questions.
Students go to school to learn reading, writing and mathematics.
The teacher wrote the answer on the board and the students copied it.
The river flows slowly through the old town and under the stone bridge.
The old town has narrow streets, small shops and a large church.
In the morning the farmer walks to the field and feeds the animals.
The farmer grows wheat, corn and potatoes on his land.
Cows give milk, hens lay eggs and sheep give wool.
Scientists study the stars because they want to understand the universe.
The sun is a star and the earth is a planet that moves around it.
The moon moves around the earth once every month.
Light from distant stars takes many years to reach us.
My favourite book tells the story of a young girl who travels around the world.
She meets many people and learns about their lives and their languages.
The story ends when she returns home and writes a book about her journey.
The train to the city leaves at eight o'clock in the morning.
The bus is slower than the train but it is cheaper.
People travel by car, by train, by plane and by ship.
Computers store information in memory and on disks.
A computer program is a list of instructions for the machine.
The processor reads instructions from memory and executes them one by one.
Software engineers write code, test it and fix the bugs they find.
Music can make people feel happy when they are sad.
Music is made of rhythm, melody and harmony.
Many people learn to play the piano or the guitar when they are young.
The small cat sat near the window and watched the birds in the garden.
The dog ran across the park and jumped into the water.
Birds build nests in the trees and sing in the early morning.
The children played in the garden until the sun went down.
Water boils at one hundred degrees and freezes at zero degrees.
Plants need water, light and air to grow.
Trees produce oxygen and give shade on hot days.
The ocean covers most of the surface of the earth.
Mountains are high and cold, and some of them are covered with snow.
The history of the world is full of wars, discoveries and inventions.
The printing press made books cheaper and helped ideas to spread.
The internet connects computers all over the world.
People use phones to call their friends and to read the news.
A healthy diet includes fruit, vegetables, bread and fish.
Doctors help people who are sick and nurses take care of them in hospitals.
Exercise makes the body strong and the mind clear.
Sleep is important for health and for memory.
The market opens early and sells fresh bread, cheese and fruit.
Money is used to buy food, clothes and houses.
A bank keeps money safe and lends it to people and companies.
The economy grows when people work, trade and invest.
Mathematics is the language of science and engineering.
Numbers can be added, subtracted, multiplied and divided.
A triangle has three sides and a square has four sides.
Energy cannot be created or destroyed, only changed from one form to another.
Electricity flows through wires and powers lights and machines.
The engine of a car burns fuel to produce motion.
Art helps people express feelings that are hard to put into words.
The painter used bright colours to show the light of the morning.
Writers use words to tell stories, share ideas and describe the world.
A library is a quiet place full of books and readers.
Language allows people to share knowledge across generations.
Translation turns words in one language into words in another language.
Questions lead to answers, and answers lead to new questions.
The best way to learn is to practice every day.
Good friends listen, help and tell the truth.
A city needs clean water, safe roads and good schools.
The government makes laws and the courts decide if they are broken.
Freedom, justice and peace are important values for many people.
The user asked a question and the assistant gave a helpful answer.
The assistant explains ideas clearly and politely.
Thank you for your question, here is a short answer.
Hello, how are you today? I am fine, thank you.
"""

_TEMPLATE_SUBJECTS = [
    "The student", "The scientist", "The engineer", "A young writer", "The old farmer",
    "The doctor", "My friend", "The teacher", "The computer", "The model",
]
_TEMPLATE_PREDICATES = [
    "reads a book about history every evening.",
    "writes code in Python to analyse the data.",
    "explains how machine learning works.",
    "studies the theory of relativity and quantum mechanics.",
    "travels to the capital to meet the government.",
    "learns a new language by reading stories.",
    "asks a question about the meaning of life.",
    "builds a small program that predicts the weather.",
]


def _training_lines() -> list[str]:
    """The embedded corpus plus subject/predicate combinations of it."""
    lines = _CORPUS.splitlines()
    lines += [f"{s} {p}" for s in _TEMPLATE_SUBJECTS for p in _TEMPLATE_PREDICATES]
    return lines


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_TARGET, lines: Iterable[str] | None = None):
    """Train the byte-level BPE tokenizer on ``lines`` (default: the embedded corpus); deterministic.

    Prepends ``<s>`` like the real MiniCPM tokenizer does, so prompts served
    by vLLM start with BOS. Well under a second on the embedded corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_lines() if lines is None else lines, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", BOS_TOKEN_ID)],
    )
    for token_id, token in enumerate(SPECIAL_TOKENS[:3]):
        assert tokenizer.token_to_id(token) == token_id, token
    return tokenizer


@functools.lru_cache(maxsize=1)
def _default_tokenizer_json() -> str:
    """The default tokenizer, trained once per process (it is deterministic, and every synthetic
    checkpoint a test session or benchmark writes uses it)."""
    return build_tokenizer().to_str()


def default_tokenizer():
    """A fresh copy of :func:`build_tokenizer`'s default result, without training it again."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_default_tokenizer_json())
