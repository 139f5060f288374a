"""The wide out-of-domain grammar's frames: what a person might ask a voice assistant that this
model cannot do, as request frames ("could you {act}", "why {why}", "I {state}") over fillers.

Contract: `candidate_requests()` lists every frame filled with every filler, in a fixed order,
duplicates and all. It holds no opener or closer (fallback.py adds those) and is not yet checked
against the domain or the evaluation's wording: fallback.py's `wide_requests` drops what clashes,
so a filler may be written freely. Content is British English and lower case, as espeak-ng and
festival read it. This module knows nothing of splits, audio or models.
"""

from __future__ import annotations

import itertools

# things to ask it to do: verb phrases, each read after every ACT_FRAME
_ACTS = (
    *(f"play {m}" for m in ("some rock music", "the radio", "a podcast", "my playlist", "classical music",
                            "some piano", "the latest news", "a lullaby", "songs by the beatles",
                            "some reggae")),
    *(f"turn {s} the {d}" for s in ("on", "off") for d in ("heater", "fan", "television", "oven", "kettle",
                                                        "dishwasher", "porch light", "speakers", "radiator")),
    *(f"book {b}" for b in ("a taxi", "a flight to rome", "a hotel room", "a haircut", "a train ticket",
                            "tickets for the theatre", "an appointment with the doctor", "a massage")),
    *(f"order {f}" for f in ("some sushi", "noodles", "a burger", "groceries", "flowers for my wife",
                             "a birthday cake", "new printer ink", "dinner from the thai place")),
    *(f"find {x}" for x in ("my keys", "my phone", "a cheap hotel", "a dentist nearby",
                            "the nearest pharmacy", "a parking space", "my glasses", "a vegan cafe",
                            "the bus route home")),
    *(f"call {p}" for p in ("my dad", "my sister", "my boss", "the plumber", "grandma", "the office",
                            "my friend anna", "the landlord", "a taxi company")),
    *(f"text {p} that I am late" for p in ("my wife", "my husband", "the team", "james")),
    *(f"buy {x}" for x in ("milk", "bread", "new shoes", "batteries", "concert tickets", "a present for jack",
                           "dog food", "a new laptop")),
    *(f"explain {t}" for t in ("photosynthesis", "gravity", "how planes fly", "how magnets work",
                               "the rules of cricket", "inflation", "how vaccines work", "quantum physics",
                               "how rainbows form", "why we dream")),
    *(f"write {w}" for w in ("a song", "an essay on history", "a shopping list", "an email to my boss",
                             "a thank you note", "a short speech", "a love letter", "a cover letter")),
    *(f"help me {h}" for h in ("pack for a trip", "fix my bike", "study for an exam", "choose a gift",
                               "clean the kitchen", "plan a party", "learn spanish", "write a poem",
                               "lose weight", "sleep better")),
    *(f"teach me how to {h}" for h in ("knit", "swim", "juggle", "dance the tango", "bake bread", "drive",
                                       "play guitar", "cook rice")),
    *(f"show me {s}" for s in ("the map", "pictures of cats", "the way to the beach", "my calendar",
                               "some funny videos", "photos from last summer")),
    *(f"open {o}" for o in ("the garage door", "the curtains", "my email", "the front gate", "the windows")),
    *(f"tell me {t}" for t in ("a joke", "a riddle", "a fun fact", "a secret", "something interesting",
                               "about dinosaurs", "about the moon landing", "about your family")),
    *(f"sing {s}" for s in ("a song", "happy birthday", "something cheerful", "me a lullaby")),
    *(f"draw {d}" for d in ("a cat", "a house by the sea", "a dragon", "me a picture")),
    "lock the doors", "start the car", "feed the dog", "walk the dog", "wake me up early",
    "make me a sandwich", "clean my room", "do my homework", "pay the bills", "cancel my meeting",
    "check my emails", "search the web", "take a photo", "record this conversation", "save this note",
)
ACT_FRAMES = ("{}", "can you {}", "could you {}", "would you {}", "I want you to {}", "I need you to {}",
              "I would like you to {}", "will you {}", "go and {}", "try to {}")
# questions: frame and filler together
_WHAT = ("the tallest building", "the population of india", "the speed of light", "the meaning of life",
         "the biggest animal", "the longest river", "the price of gold", "the score", "the news today",
         "your favourite film star", "the recipe for pancakes", "the largest ocean", "a black hole",
         "your favourite book", "the best pizza place", "the fastest car", "the deepest lake", "your job")
_WHO = ("the president", "albert einstein", "the king of spain", "your favourite singer", "shakespeare",
        "the richest person", "your creator", "the prime minister", "mozart", "the first astronaut")
_WHERE = ("the station", "my car", "the nearest bank", "the library", "paris", "the toilet", "my wallet",
          "the post office", "australia", "the nearest petrol station")
_WHY = ("do cats purr", "is the ocean salty", "do leaves fall", "do we sleep", "do birds sing",
        "is ice slippery", "do dogs bark", "is the sea so big", "do people laugh", "is coffee bitter",
        "do stars twinkle", "does bread rise")
_HOW_DO_I = ("bake a cake", "tie a tie", "change a tyre", "get to the airport", "boil an egg", "make friends",
             "fix a leaking tap", "get rid of ants", "learn to code", "grow tomatoes", "unblock a sink",
             "cure hiccups", "save money")
_HOW_ADJ = ("far is the moon", "big is the sun", "deep is the sea", "old is the earth",
            "heavy is an elephant", "cold is antarctica", "fast can a cheetah run",
            "high can a kangaroo jump", "long is the river nile")
_WHEN = ("is the next bus", "does the bank close", "is the concert", "is christmas", "does the match start",
         "does the shop open", "was the war", "does summer start", "is my dentist appointment", "is dinner")
_DO_YOU = ("enjoy music", "like pizza", "play video games", "know any jokes", "speak french", "get bored",
           "ever sleep", "have friends", "eat food", "like rainy days", "believe in ghosts", "like your job",
           "watch football", "know my name", "feel happy", "like cats or dogs", "read books", "own a car")
_STATES = ("am bored", "lost my wallet", "need a nap", "just got home", "love pizza", "cannot sleep",
           "am hungry", "am so excited", "had a terrible week", "want to go out", "burnt my toast",
           "forgot my umbrella", "passed my driving test", "miss my family", "am learning to paint",
           "think it might snow", "feel a bit sick", "bought a new bike")
_MY = ("dog is barking", "back hurts", "phone is broken", "car won't start", "sister is getting married",
       "team lost again", "garden looks lovely", "neighbours are noisy", "coffee is cold", "train is late",
       "computer keeps crashing", "friend is visiting")
_IS_IT = ("cold outside", "going to snow", "sunny in spain", "safe to swim", "too late to call", "a holiday",
          "warm enough for shorts", "true that cats have nine lives", "going to be foggy", "worth it")
_SHOULD_I = ("wear a coat", "buy a house", "learn the piano", "go to bed", "take the bus", "call her back",
             "quit my job", "get a cat", "paint the fence", "go jogging")
_WHICH = ("planet is the biggest", "bus goes to town", "shoes should I wear", "language is the hardest",
          "city is nicer to live in", "wine goes with fish", "way is north", "animal is the fastest",
          "singer do you like", "book should I read next", "team do you support", "day is the party",
          "song is playing", "dog breed is friendliest", "train goes to leeds")
_WHATS = ("for dinner tonight", "on the telly", "your opinion of jazz", "happening in the world",
          "the traffic like", "the best way to relax", "your star sign", "the capital of peru")


def candidate_requests() -> list[str]:
    """Every frame with every filler, in a fixed order (duplicates kept; fallback.py filters)."""
    return [
        *(frame.format(act) for act, frame in itertools.product(_ACTS, ACT_FRAMES)),
        *(f"what is {w}" for w in _WHAT), *(f"do you know {w}" for w in _WHAT),
        *(f"who is {w}" for w in _WHO), *(f"tell me about {w}" for w in _WHO),
        *(f"where is {w}" for w in _WHERE), *(f"where can I find {w}" for w in _WHERE[2:]),
        *(f"why {w}" for w in _WHY), *(f"do you know why {w}" for w in _WHY),
        *(f"how do I {w}" for w in _HOW_DO_I), *(f"what is the easiest way to {w}" for w in _HOW_DO_I),
        *(f"how {w}" for w in _HOW_ADJ), *(f"when {w}" for w in _WHEN),
        *(f"do you {w}" for w in _DO_YOU), *(f"I {w}" for w in _STATES), *(f"my {w}" for w in _MY),
        *(f"is it {w}" for w in _IS_IT), *(f"should I {w}" for w in _SHOULD_I),
        *(f"what's {w}" for w in _WHATS), *(f"which {w}" for w in _WHICH),
    ]
