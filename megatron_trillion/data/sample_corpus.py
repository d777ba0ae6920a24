"""A deterministic, download-free multilingual JSONL corpus (English, Korean, Japanese).

Used by the quickstart, the benchmarks and the tests: each line is
``{"id": ..., "text": ..., "lang": "en"|"ko"|"ja", "quality": float}``.

The text is generated from small hand-written vocabularies and sentence templates with real
grammar (Korean particles follow the final consonant of the noun, Japanese uses the polite
verb forms and particles), so a BPE learns meaningful merges and a tiny LM can lower its loss.
Quality scores are correlated with content: low-scoring documents repeat themselves and carry
boilerplate, as low-quality web text does, so quality tiers differ in a learnable way.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

LANGUAGES = ("en", "ko", "ja")

_EN_NOUNS = (
    "student teacher city river mountain book market train friend company garden window "
    "kitchen village doctor engineer farmer painter scientist library museum bridge harbor "
    "forest island road computer program language question answer letter song movie "
    "coffee bread apple dinner morning evening winter summer festival hospital station office"
).split()
_EN_VERBS_PAST = (
    "visited found built painted described opened carried remembered studied repaired "
    "watched followed measured explained planted discovered cleaned borrowed wrote designed"
).split()
_EN_ADJ = (
    "old new small large quiet busy bright dark warm cold famous ancient modern simple "
    "careful curious gentle strange beautiful narrow"
).split()
_EN_ADV = "slowly quickly carefully quietly happily suddenly finally often rarely gladly".split()
_EN_TIME = (
    "Yesterday|Last week|In the morning|After dinner|Every summer|On Monday|Later that day|"
    "Long ago|This year|Before sunrise"
).split("|")
_EN_CONNECT = ("because", "although", "while", "so", "and then", "but")
_EN_TEMPLATES = (
    "{time}, the {adj} {n1} {verb} the {n2}.",
    "The {n1} {adv} {verb} a {adj} {n2} near the {n3}.",
    "{time}, a {n1} from the {n3} {verb} the {adj} {n2}, {conn} the {n4} was {adj2}.",
    "Why did the {n1} go to the {n2}?",
    "Nobody expected the {n1} to be so {adj}!",
    "In the {adj} {n3}, {count} {n1}s {verb} {count2} {n2}s.",
    "The {n1} said, \"The {n2} is {adj} today.\"",
)
_EN_NUMBERS = "two three four five six seven eight nine ten twelve".split()

_KO_NOUNS = (
    "학생 선생님 도시 강 산 책 시장 기차 친구 회사 정원 창문 부엌 마을 의사 기술자 농부 화가 "
    "과학자 도서관 박물관 다리 항구 숲 섬 길 컴퓨터 프로그램 언어 질문 대답 편지 노래 영화 커피 "
    "빵 사과 저녁 아침 겨울 여름 축제 병원 역 사무실 바다 하늘 고양이 강아지"
).split()
_KO_VERBS = (
    "방문했습니다 찾았습니다 만들었습니다 그렸습니다 설명했습니다 열었습니다 기억했습니다 "
    "공부했습니다 고쳤습니다 보았습니다 따라갔습니다 심었습니다 발견했습니다 청소했습니다 "
    "빌렸습니다 썼습니다 좋아합니다 기다립니다 읽습니다 준비합니다"
).split()
_KO_ADJ = (
    "오래된 새로운 작은 큰 조용한 바쁜 밝은 어두운 따뜻한 차가운 유명한 현대적인 간단한 "
    "아름다운 좁은 이상한 친절한"
).split()
_KO_ADV = "천천히 빨리 조심스럽게 조용히 즐겁게 갑자기 마침내 자주 가끔 함께".split()
_KO_TIME = ("어제", "지난주에", "아침에", "저녁을 먹은 후에", "여름마다", "월요일에",
            "그날 오후에", "오래전에", "올해", "해가 뜨기 전에")
_KO_TEMPLATES = (
    "{time} {adj} {n1}{topic} {n2}{obj} {verb}.",
    "{n1}{topic} {n3}에서 {adv} {adj} {n2}{obj} {verb}.",
    "{time} {n3}에 사는 {n1}{subj} {adj} {n2}{obj} {verb}.",
    "왜 {n1}{topic} {n2}에 갔을까요?",
    "{n1}{topic} 정말 {adj2} {n2}{obj} 좋아합니다!",
    "{n3}에는 {n1}{conj} {n2}{subj} 있습니다.",
    "{n1}{topic} \"{n2}{topic2} 오늘 정말 좋습니다\"라고 말했습니다.",
)

_JA_NOUNS = (
    "学生 先生 町 川 山 本 市場 電車 友達 会社 庭 窓 台所 村 医者 技術者 農家 画家 科学者 図書館 "
    "博物館 橋 港 森 島 道 コンピューター プログラム 言葉 質問 答え 手紙 歌 映画 コーヒー パン "
    "りんご 夕食 朝 冬 夏 祭り 病院 駅 事務所 海 空 猫 犬"
).split()
_JA_VERBS = (
    "訪ねました 見つけました 作りました 描きました 説明しました 開けました 覚えました 勉強しました "
    "直しました 見ました 植えました 発見しました 掃除しました 借りました 書きました 待ちます "
    "読みます 準備します 使います 食べます"
).split()
_JA_ADJ = (
    "古い 新しい 小さい 大きい 静かな にぎやかな 明るい 暗い 暖かい 冷たい 有名な 簡単な "
    "きれいな 狭い 不思議な 親切な"
).split()
_JA_ADV = "ゆっくり すぐに 注意深く 静かに 楽しく 突然 ついに よく ときどき 一緒に".split()
_JA_TIME = "昨日 先週 朝 夕食の後 毎年夏 月曜日 その日の午後 昔 今年 日の出の前".split()
_JA_TEMPLATES = (
    "{time}、{adj}{n1}は{n2}を{verb}。",
    "{n1}は{n3}で{adv}{adj}{n2}を{verb}。",
    "{time}、{n3}に住む{n1}が{adj}{n2}を{verb}。",
    "どうして{n1}は{n2}へ行ったのでしょうか？",
    "{n1}はとても{adj}{n2}が好きです！",
    "{n3}には{n1}と{n2}があります。",
    "{n1}は「{n2}は今日も{adj}」と言いました。",
)

_BOILERPLATE = {
    "en": ("Click here to subscribe.", "All rights reserved.", "Share this page!"),
    "ko": ("구독하려면 여기를 누르세요.", "모든 권리 보유.", "이 페이지를 공유하세요!"),
    "ja": ("購読はこちらをクリック。", "無断転載を禁じます。", "このページを共有してください！"),
}


def _has_final_consonant(word: str) -> bool:
    """True when the last Hangul syllable has a batchim (decides 은/는, 이/가, 을/를, 과/와)."""
    code = ord(word[-1]) - 0xAC00
    return 0 <= code < 11172 and code % 28 != 0


def _english_sentence(rng: random.Random) -> str:
    nouns = rng.sample(_EN_NOUNS, 4)
    return rng.choice(_EN_TEMPLATES).format(
        time=rng.choice(_EN_TIME), adj=rng.choice(_EN_ADJ), adj2=rng.choice(_EN_ADJ),
        adv=rng.choice(_EN_ADV), verb=rng.choice(_EN_VERBS_PAST), conn=rng.choice(_EN_CONNECT),
        n1=nouns[0], n2=nouns[1], n3=nouns[2], n4=nouns[3],
        count=rng.choice(_EN_NUMBERS), count2=rng.choice(_EN_NUMBERS),
    )


def _korean_sentence(rng: random.Random) -> str:
    n1, n2, n3 = rng.sample(_KO_NOUNS, 3)
    batchim1, batchim2 = _has_final_consonant(n1), _has_final_consonant(n2)
    adj2 = rng.choice(_KO_ADJ)
    return rng.choice(_KO_TEMPLATES).format(
        time=rng.choice(_KO_TIME), adj=rng.choice(_KO_ADJ), adj2=adj2,
        adv=rng.choice(_KO_ADV), verb=rng.choice(_KO_VERBS), n1=n1, n2=n2, n3=n3,
        topic="은" if batchim1 else "는", topic2="은" if batchim2 else "는",
        subj="이" if batchim2 else "가",
        obj="을" if batchim2 else "를", conj="과" if batchim1 else "와",
    )


def _japanese_sentence(rng: random.Random) -> str:
    n1, n2, n3 = rng.sample(_JA_NOUNS, 3)
    return rng.choice(_JA_TEMPLATES).format(
        time=rng.choice(_JA_TIME), adj=rng.choice(_JA_ADJ), adv=rng.choice(_JA_ADV),
        verb=rng.choice(_JA_VERBS), n1=n1, n2=n2, n3=n3,
    )


_SENTENCE_MAKERS = {"en": _english_sentence, "ko": _korean_sentence, "ja": _japanese_sentence}
_SENTENCE_JOINERS = {"en": " ", "ko": " ", "ja": ""}


@dataclass(frozen=True)
class SampleDocument:
    """One generated document."""

    id: str
    text: str
    lang: str
    quality: float

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "text": self.text, "lang": self.lang, "quality": self.quality},
            ensure_ascii=False,
        )


def _document(lang: str, index: int, rng: random.Random, max_paragraphs: int) -> SampleDocument:
    quality = round(rng.random(), 4)
    make, joiner = _SENTENCE_MAKERS[lang], _SENTENCE_JOINERS[lang]
    paragraphs = []
    for _ in range(rng.randint(1, max_paragraphs)):
        sentences = [make(rng) for _ in range(rng.randint(2, 6))]
        if quality < 0.3:
            # low-quality documents repeat sentences and carry boilerplate
            sentences = sentences[:2] * rng.randint(2, 3) + [rng.choice(_BOILERPLATE[lang])]
        paragraphs.append(joiner.join(sentences))
    return SampleDocument(
        id=f"{lang}-{index:07d}", text="\n\n".join(paragraphs), lang=lang, quality=quality
    )


def iter_sample_documents(
    docs_per_lang: int = 200,
    seed: int = 1234,
    languages: tuple[str, ...] = LANGUAGES,
    max_paragraphs: int = 3,
) -> Iterator[SampleDocument]:
    """Yields documents interleaved across languages (en, ko, ja, en, ...), deterministically.

    The same (docs_per_lang, seed, languages, max_paragraphs) always yields the same documents.
    """
    unknown = [lang for lang in languages if lang not in _SENTENCE_MAKERS]
    if unknown:
        raise ValueError(f"sample corpus has no material for languages {unknown}; "
                         f"choose from {list(LANGUAGES)}")
    if docs_per_lang < 0:
        raise ValueError(f"docs_per_lang must be >= 0, got {docs_per_lang}")
    rngs = {lang: random.Random(f"{seed}-{lang}") for lang in languages}
    for index in range(docs_per_lang):
        for lang in languages:
            yield _document(lang, index, rngs[lang], max_paragraphs)


def write_sample_corpus(
    path: str | Path,
    docs_per_lang: int = 200,
    seed: int = 1234,
    languages: tuple[str, ...] = LANGUAGES,
    max_paragraphs: int = 3,
) -> Path:
    """Writes the sample corpus as JSONL (gzip-compressed when `path` ends in .gz); returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as out:
        for doc in iter_sample_documents(docs_per_lang, seed, languages, max_paragraphs):
            out.write(doc.to_json() + "\n")
    return path


# --------------------------------------------------------------------------------------------
# chat conversations for supervised fine-tuning (``pretrain --sft``)

_REPEAT_REQUEST = {"en": "Repeat after me: ", "ko": "따라 말해 보세요: ", "ja": "繰り返してください: "}
_SYSTEM_PROMPT = {"en": "You are a helpful assistant.", "ko": "당신은 친절한 도우미입니다.",
                  "ja": "あなたは親切なアシスタントです。"}
# Words for prompts whose content is pure noise (kind "ok").
RANDOM_PROMPT_WORDS = tuple(_EN_NOUNS + _EN_VERBS_PAST + _EN_ADJ)
CONVERSATION_KINDS = ("repeat", "ok")


def iter_sample_conversations(num: int = 300, seed: int = 1234,
                              languages: tuple[str, ...] = LANGUAGES,
                              kind: str = "repeat") -> Iterator[dict]:
    """Chat records ``{"messages": [...], "lang": ...}``, deterministically.

    ``kind="repeat"``: one or two user turns asking to repeat a generated sentence, each
    answered with that sentence (a third of them with a system prompt), cycling through
    ``languages``. ``kind="ok"``: English prompts of 6-12 words drawn uniformly from
    :data:`RANDOM_PROMPT_WORDS`, always answered "OK" - the prompt carries
    ``log(len(RANDOM_PROMPT_WORDS))`` nats per word no model can predict, the answer none.
    """
    if kind not in CONVERSATION_KINDS:
        raise ValueError(f"kind must be one of {CONVERSATION_KINDS}, got {kind!r}")
    unknown = [lang for lang in languages if lang not in _SENTENCE_MAKERS]
    if unknown:
        raise ValueError(f"sample conversations have no material for languages {unknown}")
    rng = random.Random(f"{seed}-chat-{kind}")
    for index in range(num):
        if kind == "ok":
            words = [rng.choice(RANDOM_PROMPT_WORDS) for _ in range(rng.randint(6, 12))]
            yield {"messages": [{"role": "user", "content": " ".join(words)},
                                {"role": "assistant", "content": "OK"}], "lang": "en"}
            continue
        lang = languages[index % len(languages)]
        messages = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": _SYSTEM_PROMPT[lang]})
        for _ in range(rng.randint(1, 2)):
            sentence = _SENTENCE_MAKERS[lang](rng)
            messages.append({"role": "user", "content": _REPEAT_REQUEST[lang] + sentence})
            messages.append({"role": "assistant", "content": sentence})
        yield {"messages": messages, "lang": lang}


def write_sample_conversations(path: str | Path, num: int = 300, seed: int = 1234,
                               languages: tuple[str, ...] = LANGUAGES,
                               kind: str = "repeat") -> Path:
    """Writes :func:`iter_sample_conversations` as chat JSONL; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for record in iter_sample_conversations(num, seed, languages, kind):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# a parallel multiple-choice set (for tools/eval_consistency.py)

# Words that mean the same in the three languages, all taken from the corpus vocabularies above,
# so a model trained on the sample corpus has seen them.
_PARALLEL_NOUNS = (
    ("student", "학생", "学生"), ("teacher", "선생님", "先生"), ("city", "도시", "町"),
    ("river", "강", "川"), ("mountain", "산", "山"), ("book", "책", "本"),
    ("market", "시장", "市場"), ("train", "기차", "電車"), ("friend", "친구", "友達"),
    ("company", "회사", "会社"), ("garden", "정원", "庭"), ("window", "창문", "窓"),
    ("kitchen", "부엌", "台所"), ("village", "마을", "村"), ("doctor", "의사", "医者"),
    ("library", "도서관", "図書館"), ("museum", "박물관", "博物館"), ("bridge", "다리", "橋"),
    ("harbor", "항구", "港"), ("forest", "숲", "森"), ("island", "섬", "島"),
    ("road", "길", "道"), ("coffee", "커피", "コーヒー"), ("bread", "빵", "パン"),
    ("apple", "사과", "りんご"), ("hospital", "병원", "病院"), ("station", "역", "駅"),
    ("office", "사무실", "事務所"),
)
_PARALLEL_VERBS = (
    ("visited", "방문했습니다", "訪ねました"), ("found", "찾았습니다", "見つけました"),
    ("painted", "그렸습니다", "描きました"), ("opened", "열었습니다", "開けました"),
    ("studied", "공부했습니다", "勉強しました"), ("repaired", "고쳤습니다", "直しました"),
    ("watched", "보았습니다", "見ました"), ("cleaned", "청소했습니다", "掃除しました"),
    ("borrowed", "빌렸습니다", "借りました"), ("discovered", "발견했습니다", "発見しました"),
    ("remembered", "기억했습니다", "覚えました"), ("planted", "심었습니다", "植えました"),
)
_PARALLEL_TIME = ("Yesterday", "어제", "昨日")


def _parallel_question(lang: str, subject: int, obj: int, verb: int, answer: int,
                       distractors: list[int]) -> dict:
    """One language's version: the prompt opens a sentence, the right choice finishes it in
    the language's word order, the wrong ones scramble the same words."""
    column = LANGUAGES.index(lang)
    n1, n2 = _PARALLEL_NOUNS[subject][column], _PARALLEL_NOUNS[obj][column]
    v, time = _PARALLEL_VERBS[verb][column], _PARALLEL_TIME[column]
    if lang == "en":
        prompt = f"{time}, the {n1}"
        orders = [f" {v} the {n2}.", f" the {n2} {v}.", f" {n2} the {v}.", f" {v} {n2} the."]
    elif lang == "ko":
        prompt = f"{time} {n1}{'은' if _has_final_consonant(n1) else '는'}"
        particle = "을" if _has_final_consonant(n2) else "를"
        orders = [f" {n2}{particle} {v}.", f" {v} {n2}{particle}.", f" {particle}{n2} {v}.",
                  f" {v}. {n2}{particle}"]
    else:
        prompt = f"{time}、{n1}は"
        orders = [f"{n2}を{v}。", f"{v}{n2}を。", f"を{n2}{v}。", f"{v}。{n2}を"]
    choices = [orders[d] for d in distractors]
    choices.insert(answer, orders[0])
    return {"prompt": prompt, "choices": choices, "answer": answer}


def iter_parallel_items(num_items: int = 100, seed: int = 1234,
                        languages: tuple[str, ...] = LANGUAGES) -> Iterator[dict]:
    """Parallel multiple-choice items ``{"id", "<lang>": {"prompt", "choices", "answer"}}``:
    the same sentence (subject, verb, object, the answer's position and the distractors) in
    every language, deterministically from ``seed``. Chance accuracy is 1/4."""
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown:
        raise ValueError(f"parallel items exist for {list(LANGUAGES)}, not {unknown}")
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    rng = random.Random(f"{seed}-parallel")
    for index in range(num_items):
        subject, obj = rng.sample(range(len(_PARALLEL_NOUNS)), 2)
        verb = rng.randrange(len(_PARALLEL_VERBS))
        answer = rng.randrange(4)
        distractors = rng.sample([1, 2, 3], 3)
        item = {"id": f"parallel-{index:05d}"}
        for lang in languages:
            item[lang] = _parallel_question(lang, subject, obj, verb, answer, distractors)
        yield item


def write_parallel_items(path: str | Path, num_items: int = 100, seed: int = 1234,
                         languages: tuple[str, ...] = LANGUAGES) -> Path:
    """Writes :func:`iter_parallel_items` as JSONL; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for item in iter_parallel_items(num_items, seed, languages):
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# preference pairs (for pretrain --dpo)


def iter_sample_preferences(num: int = 300, seed: int = 1234,
                            languages: tuple[str, ...] = LANGUAGES) -> Iterator[dict]:
    """Preference pairs ``{"prompt", "chosen", "rejected", "lang"}`` (TRL's shape),
    deterministically: the prompt asks in the first of ``languages`` to repeat a sentence; the
    chosen answer repeats it, the rejected one answers with a sentence of one of the other
    languages (so a model must learn to answer in the prompt's language). One language: the
    rejected answer is another sentence of the same language."""
    unknown = [lang for lang in languages if lang not in _SENTENCE_MAKERS]
    if unknown:
        raise ValueError(f"sample preferences have no material for languages {unknown}")
    rng = random.Random(f"{seed}-preferences")
    lang = languages[0]
    others = [other for other in languages if other != lang] or [lang]
    for _ in range(num):
        sentence = _SENTENCE_MAKERS[lang](rng)
        wrong = _SENTENCE_MAKERS[rng.choice(others)](rng)
        while wrong == sentence:
            wrong = _SENTENCE_MAKERS[lang](rng)
        yield {"prompt": _REPEAT_REQUEST[lang] + sentence, "chosen": sentence,
               "rejected": wrong, "lang": lang}


def write_sample_preferences(path: str | Path, num: int = 300, seed: int = 1234,
                             languages: tuple[str, ...] = LANGUAGES) -> Path:
    """Writes :func:`iter_sample_preferences` as preference JSONL; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for record in iter_sample_preferences(num, seed, languages):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
