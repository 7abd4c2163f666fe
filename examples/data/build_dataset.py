"""Writes qlora_facts.jsonl: the small instruction/answer set examples/qlora.py trains on.

Written for this repository (no third-party text): short questions on well-known facts and exact
arithmetic, each answered in one plain sentence, so the adapter's effect (terse, uniform answers)
is easy to see. Rerun to regenerate: python examples/data/build_dataset.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasília", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Russia": "Moscow", "Poland": "Warsaw", "Sweden": "Stockholm",
    "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen", "Greece": "Athens", "Turkey": "Ankara",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Czechia": "Prague", "Peru": "Lima",
    "Chile": "Santiago", "Colombia": "Bogotá", "South Korea": "Seoul", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "the Philippines": "Manila", "Iran": "Tehran",
    "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Morocco": "Rabat", "Ethiopia": "Addis Ababa",
    "Ghana": "Accra", "New Zealand": "Wellington", "Cuba": "Havana", "Iceland": "Reykjavík",
    "Ukraine": "Kyiv", "Romania": "Bucharest",
}
ELEMENTS = {
    "hydrogen": "H", "helium": "He", "lithium": "Li", "carbon": "C", "nitrogen": "N", "oxygen": "O",
    "fluorine": "F", "neon": "Ne", "sodium": "Na", "magnesium": "Mg", "aluminium": "Al", "silicon": "Si",
    "phosphorus": "P", "sulfur": "S", "chlorine": "Cl", "argon": "Ar", "potassium": "K", "calcium": "Ca",
    "iron": "Fe", "copper": "Cu", "zinc": "Zn", "silver": "Ag", "tin": "Sn", "gold": "Au", "mercury": "Hg",
    "lead": "Pb", "uranium": "U", "nickel": "Ni", "iodine": "I", "platinum": "Pt",
}
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "open": "closed", "full": "empty", "strong": "weak", "rich": "poor", "old": "new", "high": "low",
    "wet": "dry", "hard": "soft", "loud": "quiet", "thick": "thin", "true": "false", "up": "down",
    "inside": "outside", "clean": "dirty", "heavy": "light", "long": "short", "first": "last",
    "cheap": "expensive", "safe": "dangerous", "win": "lose", "push": "pull", "begin": "end",
    "remember": "forget", "accept": "refuse",
}
PAST_TENSE = {
    "go": "went", "see": "saw", "eat": "ate", "take": "took", "write": "wrote", "run": "ran",
    "swim": "swam", "sing": "sang", "drink": "drank", "begin": "began", "bring": "brought", "buy": "bought",
    "think": "thought", "teach": "taught", "catch": "caught", "fly": "flew", "know": "knew", "grow": "grew",
    "throw": "threw", "speak": "spoke", "break": "broke", "choose": "chose", "freeze": "froze",
    "drive": "drove", "ride": "rode", "rise": "rose", "give": "gave", "forget": "forgot", "sit": "sat",
    "stand": "stood",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def pairs(rng: random.Random) -> list[dict[str, str]]:
    out = []
    for country, city in CAPITALS.items():
        out.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for name, symbol in ELEMENTS.items():
        out.append((f"What is the chemical symbol for {name}?", f"The chemical symbol for {name} is {symbol}."))
    for word, opposite in ANTONYMS.items():
        out.append((f"What is the opposite of \"{word}\"?", f"The opposite of \"{word}\" is \"{opposite}\"."))
    for verb, past in PAST_TENSE.items():
        out.append((f"What is the past tense of \"{verb}\"?", f"The past tense of \"{verb}\" is \"{past}\"."))
    for i, day in enumerate(DAYS):
        out.append((f"What day comes after {day}?", f"The day after {day} is {DAYS[(i + 1) % 7]}."))
    for i, month in enumerate(MONTHS):
        out.append((f"Which month comes after {month}?", f"The month after {month} is {MONTHS[(i + 1) % 12]}."))
    for _ in range(70):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    for _ in range(45):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        out.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    for hours in range(1, 21):
        out.append((f"How many minutes are in {hours} hours?", f"There are {hours * 60} minutes in {hours} hours."))
    for km in (1, 2, 3, 5, 7, 10, 12, 15, 20, 25):
        out.append((f"How many meters are in {km} kilometers?", f"There are {km * 1000} meters in {km} kilometers."))
    rng.shuffle(out)
    return [{"instruction": q, "answer": a} for q, a in dict(out).items()]


if __name__ == "__main__":
    rows = pairs(random.Random(0))
    path = Path(__file__).with_name("qlora_facts.jsonl")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} pairs to {path}")
