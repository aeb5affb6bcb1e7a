"""Tasks, their official prompts, the chat template, and the requests tasks become.

The instructions are those of the official `prompts/test_prompt.json`; the template is the v1
`prompt_pattern` (identical to the 2024 `prompt_template` wrapped around "<Speech><SpeechHere></Speech> ").

Tasks x windows become `Request`s in one place, `task_requests`; every generator (the model's
own `Salmonn.generate_tasks`, both engines, the inference stage) takes them from there, and
`answers_by_task` files the answers back under their task.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from .config import GenerationSettings

if TYPE_CHECKING:
    import torch

A = TypeVar("A")

TEMPLATE = "USER: <Speech><SpeechHere></Speech> {}\nASSISTANT:"
SPEECH_PLACEHOLDER = "<SpeechHere>"

# Official test prompts (task name in test_prompt.json -> instruction). "{}" is a question/slot.
OFFICIAL_PROMPTS: dict[str, str] = {
    "asr": "Recognize the speech and give me the transcription.",
    "asr_zh": "请将语音中的内容写下来。",
    "asr_de": "Hören Sie sich die Rede an und schreiben Sie ihren Inhalt auf.",
    "translation_ec": "Listen to the speech and translate it into Chinese.",
    "translation_en2ja": "Listen to the speech and translate it into Japanese.",
    "translation_en2de": "Listen to the speech and translate it into German.",
    "audiocaption": "Please describe the audio.",
    "audiocaption_v2": "Please write down what your hear in the audio.",  # typo as in the source
    "QA": "{}",
    "gender_QA": "{}",
    "phone_recognition": "Provide the phonetic transcription for the speech.",
    "speech_query": "Please answer the question in detail.",
    "emotion_recognition": "Describe the emotion of the speaker in one word.",
    "lyrics_recognition": "Listen to the song and write down its content.",
    "audio_speech_description": "Describe the speech and the background audio",
    "speaker_verification": "Do you only hear the same person talking? Answer yes or no.",
    "fluent_speech_audio": "Describe the background audio and the speech in a fluent sentence.",
    "speech_separation": "Please write down what you hear each person says.",
    "audio_story_telling": (
        "Based on the audio, write a story in detail. Your story should be highly related to the audio."
    ),
    "speech_audio_query": "Please answer the speaker's question in detail based on the background sound.",
    "slot_filling": "According to the speech, what is the {}?",
    "music_description": "Listen to this music clip and describe the music.",
    "speech_audio_coreasoning": (
        "Use your strong reasoning skills to answer the speaker's question in detail based on the background sound."
    ),
    "keywords": "Give me only three keywords of the text.",
    "speaker_diarization_asr": "Please recognize each speaker and transcribe their speech content.",
}

# Pipeline task names -> official prompt keys
BUILTIN_TASKS: dict[str, str] = {
    "caption": "audiocaption",
    "transcribe": "asr",
    "emotion": "emotion_recognition",
    "music": "music_description",
    "story": "audio_story_telling",
    "describe": "audio_speech_description",
    "translate_zh": "translation_ec",
    "translate_de": "translation_en2de",
    "translate_ja": "translation_en2ja",
    "phonemes": "phone_recognition",
    "lyrics": "lyrics_recognition",
    "keywords": "keywords",
}

# Official prompts whose answer is about a voice: meaningless for a window without speech (the
# model invents a transcript for music or noise), so the speech gate skips them there. The
# others (captions, music, stories, descriptions of speech *and* background, lyrics) describe any
# audio and run on every window that is not digital silence.
SPEECH_PROMPTS = frozenset({
    "asr", "asr_zh", "asr_de", "translation_ec", "translation_en2ja", "translation_en2de",
    "phone_recognition", "emotion_recognition", "speaker_verification", "speech_separation",
    "keywords", "speaker_diarization_asr", "speech_query", "slot_filling",
})


@dataclass(frozen=True)
class Task:
    """One question to ask of every window: a name, the instruction, and how to decode.

    ``needs_speech``: the answer is only meaningful where someone speaks (a transcript, an
    emotion); with the speech gate on, windows without speech get this task's row with no text
    (finish reason ``no_speech``) instead of a generation. Built-in tasks set it from
    :data:`SPEECH_PROMPTS`; custom prompts default to False (run everywhere).
    """

    name: str
    prompt: str
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    needs_speech: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("task name must not be empty")
        if not self.prompt.strip():
            raise ValueError(f"task {self.name!r}: prompt must not be empty")
        if SPEECH_PLACEHOLDER in self.prompt:
            raise ValueError(f"task {self.name!r}: prompt must not contain {SPEECH_PLACEHOLDER}")
        if not isinstance(self.needs_speech, bool):
            raise ValueError(f"task {self.name!r}: needs_speech must be true or false, got {self.needs_speech!r}")


def builtin_task(name: str, settings: GenerationSettings | None = None) -> Task:
    """A built-in task ("caption", "transcribe", "emotion", ...) or an official prompt key."""
    key = BUILTIN_TASKS.get(name, name)
    if key not in OFFICIAL_PROMPTS or "{}" in OFFICIAL_PROMPTS[key]:
        raise ValueError(f"unknown task {name!r}; built-in: {sorted(BUILTIN_TASKS)}")
    return Task(name=name, prompt=OFFICIAL_PROMPTS[key], settings=settings or GenerationSettings(),
                needs_speech=key in SPEECH_PROMPTS)


def default_tasks(settings: GenerationSettings | None = None) -> tuple[Task, ...]:
    """caption, transcribe, emotion with the official prompts."""
    return tuple(builtin_task(name, settings) for name in ("caption", "transcribe", "emotion"))


def split_prompt(prompt: str) -> tuple[str, str]:
    """Text before and after the speech embeddings, as the official prompt_wrap splits it.

    >>> split_prompt("Please describe the audio.")
    ('USER: <Speech>', '</Speech> Please describe the audio.\\nASSISTANT:')
    """
    before, after = TEMPLATE.format(prompt.strip()).split(SPEECH_PLACEHOLDER)
    return before, after


@dataclass(frozen=True)
class Request:
    """One answer to generate: a prompt about one window's speech embeddings."""

    speech: torch.Tensor  # (W*Q, D) one window's rows of Salmonn.encode
    prompt: str  # the instruction (the chat template is applied by the model: prompt_parts)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    # Benchmarks only: generate exactly this many tokens, EOS never emitted, so that every engine
    # generates the same number of tokens (settings.max_new_tokens is then ignored).
    exact_new_tokens: int | None = None
    task: str | None = None  # the task's name (task_requests); None for a request made by hand
    row: int | None = None  # the row of the speech embeddings it asks about (task_requests)

    def __post_init__(self) -> None:
        if self.speech.ndim != 2:
            raise ValueError(f"Request.speech must be (W*Q, D), got shape {tuple(self.speech.shape)}")
        if self.exact_new_tokens is not None and self.exact_new_tokens < 1:
            raise ValueError(f"Request.exact_new_tokens must be >= 1, got {self.exact_new_tokens}")


def task_requests(
    speech_embeds: torch.Tensor, tasks: Sequence[Task], row_tasks: Sequence[Collection[Task]] | None = None
) -> list[Request]:
    """The requests for `tasks` on the rows (windows) of speech_embeds (B, W*Q, D), task-major:
    all of the first task's rows, then the second task's, ... Each request names its task and row.

    `row_tasks[i]`: the tasks row i runs (the speech gate's choice); None: every task on every row.
    Task-major order lets the HF engine batch the rows of tasks with equal settings together;
    vLLM takes them all at once.
    """
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    if row_tasks is not None and len(row_tasks) != speech_embeds.shape[0]:
        raise ValueError(f"{speech_embeds.shape[0]} speech rows but {len(row_tasks)} row_tasks")
    return [
        Request(speech, task.prompt, task.settings, task=task.name, row=i)
        for task in tasks
        for i, speech in enumerate(speech_embeds)
        if row_tasks is None or task in row_tasks[i]
    ]


def answers_by_task(tasks: Sequence[Task], requests: Sequence[Request], answers: Sequence[A]) -> dict[str, list[A]]:
    """{task name: [answer per request of that task, in request order]} for `task_requests`'
    requests and their answers, in the order of `tasks` (a task without requests: [])."""
    out: dict[str, list[A]] = {t.name: [] for t in tasks}
    for request, answer in zip(requests, answers, strict=True):
        if request.task not in out:
            raise ValueError(f"a request of task {request.task!r}, which is not among {list(out)}")
        out[request.task].append(answer)
    return out
