"""Training prompts for self-distillation, built from offline sources only.

Three sources, all read from this machine (nothing is downloaded):

* ``template``: hand-written templates with slot fillers, many per task type;
* ``stdlib``: Python's standard library source and docstrings, parsed with ``ast``
  from the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (nothing is imported);
* ``usr_share_doc``: ``/usr/share/doc`` if present: ``*/copyright`` license texts
  (legal) and README / ``changelog.Debian`` texts (summarization). Skipped if absent.

Output is deterministic for a given ``(n_per_task, seed)`` on a given machine, and no
training prompt equals or contains an evaluation prompt (compared case- and
whitespace-insensitively): candidates that do are dropped, and the result is checked.
"""
from __future__ import annotations

import ast
import gzip
import json
import os
import random
import re
import sys
import sysconfig
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from specdeploy.bench.tasks import TASKS, Prompt, builtin_prompts
from specdeploy.errors import SpecDeployError

DOC_ROOT = Path("/usr/share/doc")
SOURCES: tuple[str, ...] = ("template", "stdlib", "usr_share_doc")

_MAX_READ = 64 * 1024  # bytes read from any one file
_MAX_CHUNK = 1200  # characters of quoted material per prompt

# --------------------------------------------------------------------------------------
# Slot fillers. A value may itself contain {slots}; a trailing digit in a slot name
# ({city2}) draws from the same pool but avoids repeating a value already used.
# --------------------------------------------------------------------------------------

_SLOTS: dict[str, list[str]] = {
    # shared
    "person": ["Alex", "Priya", "Jordan", "Chen", "Fatima", "Lucas", "Emma", "Omar", "Sofia", "Daniel",
               "Aisha", "Mateo", "Hannah", "Kenji", "Grace", "Ivan", "Nadia", "Tom", "Leila", "Marcus"],
    "city": ["Lisbon", "Toronto", "Nairobi", "Seoul", "Denver", "Madrid", "Oslo", "Chicago", "Mumbai", "Dublin",
             "Melbourne", "Cairo", "Austin", "Prague", "Lima", "Vancouver", "Istanbul", "Hanoi", "Zurich", "Accra"],
    "num_small": ["2", "3", "4", "5", "6", "7", "10"],
    "dialect": ["PostgreSQL", "MySQL", "SQLite", "SQL Server"],
    "tlang": ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch"],
    # code
    "lang": ["Python", "JavaScript", "TypeScript", "Java", "C", "C++", "Go", "Rust", "Ruby", "PHP", "Kotlin",
             "Swift", "C#", "Bash"],
    "code_task": [
        "reverse a string", "check if a number is prime", "count the vowels in a string",
        "remove duplicates from a list while keeping the order", "merge two sorted lists",
        "find the second largest number in a list", "flatten a nested list", "convert Celsius to Fahrenheit",
        "read a CSV file and print each row", "count how often each word appears in a text",
        "check whether two strings are anagrams", "compute the factorial of a number",
        "generate the first n Fibonacci numbers", "sort a list of dictionaries by one key",
        "find the longest word in a sentence", "validate an email address",
        "capitalize the first letter of every word", "compute the median of a list of numbers",
        "rotate a list by k positions", "find the intersection of two lists", "convert a decimal number to binary",
        "check if a year is a leap year", "split a list into chunks of size n",
        "calculate the sum of the digits of a number", "find the most common element in a list",
        "parse a date string like 2023-04-05", "retry a function call up to three times",
        "measure how long a function takes to run", "read a JSON file and print one field",
        "write a list of names to a text file", "generate a random password",
        "find all files with a given extension in a folder", "compute the distance between two points",
        "implement binary search on a sorted list", "implement bubble sort",
        "check if the parentheses in a string are balanced", "group a list of words by their first letter",
        "compute a running total of a list", "transpose a matrix", "find the missing number in a sequence from 1 to n",
        "truncate a string to 20 characters with an ellipsis", "convert a list of pairs into a dictionary",
        "remove all whitespace from a string", "compute the greatest common divisor of two numbers",
        "count the lines in a file", "check whether a string contains only digits", "shuffle a deck of cards",
        "format a number with thousands separators", "compare two version strings like 1.10.2 and 1.9.8",
        "cache the results of an expensive function", "deep copy a nested dictionary",
        "find the first non-repeating character in a string", "check if a linked list has a cycle",
        "convert a Roman numeral to an integer", "print a multiplication table",
    ],
    "py_pair": ["lists and tuples", "`is` and `==`", "a shallow copy and a deep copy", "`append` and `extend`",
                "a generator and a list", "`*args` and `**kwargs`", "a class method and a static method",
                "threads and processes", "sets and dictionaries", "`return` and `yield`", "modules and packages",
                "`str()` and `repr()`", "mutable and immutable objects", "async functions and regular functions",
                "`==` and `__eq__`", "`sort()` and `sorted()`"],
    "concept": ["closures", "decorators", "recursion", "list comprehensions", "generators", "context managers",
                "exceptions", "inheritance", "interfaces", "lambda functions", "pointers", "immutability",
                "callbacks", "promises", "type hints", "unit tests", "dependency injection", "hash maps",
                "big-O notation", "variable scope", "pattern matching", "iterators", "string formatting",
                "error handling", "garbage collection", "enums"],
    "entity": ["bank account", "library book", "car", "to-do item", "student", "shopping cart", "temperature sensor",
               "playlist", "rectangle", "employee", "movie ticket", "chess piece", "recipe", "hotel room"],
    "attr": ["name", "price", "id", "creation date", "owner", "color", "size", "status", "balance", "title",
             "rating", "quantity"],
    "py_error": [
        "IndexError: list index out of range", "KeyError: 'name'",
        "TypeError: 'NoneType' object is not subscriptable", "NameError: name 'x' is not defined",
        "IndentationError: unexpected indent", "AttributeError: 'str' object has no attribute 'append'",
        "ZeroDivisionError: division by zero", "ModuleNotFoundError: No module named 'requests'",
        "TypeError: can only concatenate str (not \"int\") to str",
        "RecursionError: maximum recursion depth exceeded",
        "UnboundLocalError: cannot access local variable 'count' where it is not associated with a value",
        "ValueError: invalid literal for int() with base 10: 'abc'",
        "FileNotFoundError: [Errno 2] No such file or directory: 'data.csv'",
        "TypeError: Cannot read properties of undefined (reading 'length')",
        "SyntaxError: invalid syntax", "NullPointerException", "segmentation fault (core dumped)",
    ],
    "regex_target": ["US phone numbers like 555-123-4567", "dates in the format YYYY-MM-DD", "hex color codes",
                     "IPv4 addresses", "words that start with a capital letter", "email addresses",
                     "numbers with exactly two decimal places", "five-digit postal codes", "hashtags in a tweet",
                     "times like 14:30", "URLs that start with https"],
    # creative writing
    "form": ["poem", "short story", "haiku", "limerick", "song", "sonnet", "fable", "diary entry", "fairy tale",
             "short scene", "free verse poem", "rap verse", "nursery rhyme", "ballad", "piece of flash fiction"],
    "subject": ["the first snow of winter", "a lost umbrella", "a city waking up", "friendship",
                "a robot learning to paint", "the smell of rain", "an old library", "a long train journey",
                "the moon", "a forgotten toy", "starting a new job", "a summer thunderstorm", "a cup of tea",
                "growing old", "a busy market", "the last day of school", "a garden in spring", "a stray dog",
                "the desert at noon", "a broken clock", "homesickness", "a hot air balloon", "a mountain sunrise",
                "Monday mornings", "a grandmother's kitchen", "a space station", "a river", "the sound of a piano",
                "a letter that was never sent", "a snowman", "a bicycle ride", "fireflies", "an empty playground",
                "a long-distance friendship", "the first day at a new school", "a power outage"],
    "tone": ["funny", "sad", "hopeful", "mysterious", "cozy", "dramatic", "whimsical", "nostalgic", "spooky",
             "romantic", "inspiring", "calm"],
    "audience": ["young children", "teenagers", "my grandmother", "a group of new employees", "a wedding audience",
                 "people who love cats", "my book club"],
    "character": ["a shy robot", "an old fisherman", "a young witch", "a talking fox", "a retired astronaut",
                  "a clumsy knight", "a girl who can hear plants", "a baker", "a lonely ghost",
                  "a detective with no sense of smell", "a penguin", "a street musician", "a time traveler",
                  "a tiny mouse", "a brave turtle", "a grumpy wizard", "a new student", "an inventor"],
    "char_goal": ["wants to see the ocean", "loses their voice", "finds a map inside an old book",
                  "has to win a baking contest", "is afraid of heights", "wakes up one hundred years in the future",
                  "must deliver a secret letter", "wants to make a friend", "discovers a hidden door",
                  "is trying to get home before sunset"],
    "genre": ["mystery", "science fiction", "fantasy", "horror", "romance", "adventure", "comedy", "western",
              "historical", "thriller"],
    "setting": ["a floating city", "a small fishing village", "an abandoned space station", "a rainy city street",
                "a desert oasis", "a haunted school", "a busy train station", "a castle on a cliff",
                "an underground library", "a farm during harvest", "a snowy cabin", "a crowded night market"],
    "time_phrase": ["On the first day of winter", "Late one night", "Just before the storm", "Every morning at six",
                    "On her seventieth birthday", "When the power went out", "Halfway across the bridge",
                    "Long after everyone had gone home"],
    "story_event": ["found a glowing key in the snow", "heard someone knocking from inside the wall",
                    "received a letter with no name on it", "noticed that every clock had stopped",
                    "saw a stranger sitting in the kitchen", "discovered a message written in the sand",
                    "opened a door that had always been locked", "met a cat that could speak"],
    "occasion": ["a best friend's wedding", "a retirement party", "a graduation", "a team that just finished a hard "
                 "project", "my parents' anniversary", "a New Year's Eve dinner"],
    "naming_target": ["a coffee shop", "a fantasy kingdom", "a pet hamster", "a bakery", "a rock band",
                      "a board game", "a spaceship", "a podcast about history", "a bookstore"],
    "plain_sentence": ["The dog ran across the yard.", "She opened the door and looked outside.",
                       "It was a cold day.", "The food was good.", "He was tired after work.",
                       "The city was quiet at night.", "The children played in the park.", "The car stopped suddenly."],
    "style_adj": ["vivid", "dramatic", "poetic", "funny", "suspenseful", "formal", "concise"],
    "pov_object": ["a coffee mug", "an old tree", "a lost sock", "a traffic light", "the moon", "a library book",
                   "a house cat", "a paper airplane"],
    "product": ["a reusable water bottle", "a pair of hiking boots", "a scented candle", "a smart alarm clock",
                "a handmade wooden chair", "noise-cancelling headphones"],
    "style": ["a pirate", "Shakespeare", "a sports commentator", "a nature documentary", "a fairy tale",
              "a detective novel"],
    "letter_topic": ["why they had to leave", "a secret they kept for years", "how much they miss them",
                     "a plan for a great adventure", "what happened on the night of the storm"],
    # summarization
    "famous_work": ["Hamlet", "The Odyssey", "Moby-Dick", "Cinderella", "The Little Prince", "Frankenstein",
                    "Alice's Adventures in Wonderland", "The Great Gatsby", "Little Red Riding Hood", "Don Quixote",
                    "The Tortoise and the Hare", "Treasure Island", "Jane Eyre", "A Christmas Carol",
                    "The Three Little Pigs", "Macbeth"],
    "sum_format": ["in one sentence", "in two sentences", "in three bullet points", "in under 50 words",
                   "in simple words for a child", "for a busy manager", "as a short headline", "in plain English"],
    "history_topic": ["the printing press", "the Roman Empire", "the internet", "the Olympic Games", "aviation",
                      "the telephone", "chocolate", "the bicycle", "vaccines", "the Silk Road"],
    "debate_topic": ["working from home", "school uniforms", "electric cars", "a four-day work week",
                     "banning phones in classrooms", "nuclear energy", "homework for young children",
                     "self-driving cars"],
    "team": ["marketing", "engineering", "sales", "design", "support", "finance", "product"],
    "note_item": [
        "{person} will send the updated report by {weekday}", "the budget for the new website was approved",
        "the launch is delayed by {num_small} weeks", "we need two more testers for the mobile app",
        "{person} is on vacation next week, {person2} covers", "customer complaints dropped by {pct}% this month",
        "the office printer will be replaced", "hiring for the open position is paused",
        "the client asked for a demo on {weekday}", "{person} will book the venue for the team event",
        "the new onboarding guide is almost finished", "server costs went up, need a plan to reduce them",
    ],
    "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
    "pct": ["5", "10", "12", "15", "20", "25", "30", "40"],
    "news_event": [
        "opened a new public library on Saturday", "announced that bus fares will rise next year",
        "hosted its first food festival in a decade", "began repairing the old harbor wall",
        "reported its warmest spring on record", "approved a plan to plant 10,000 trees",
    ],
    "news_detail": [
        "Officials said the project cost less than expected.", "Hundreds of residents attended the first day.",
        "The work is expected to take about eight months.", "Local businesses welcomed the decision.",
        "Some residents raised concerns about noise and traffic.", "The mayor called it an important step.",
    ],
    "review_pro": ["it does exactly what it promises", "it was easy to set up", "the price was fair",
                   "it looks great in my kitchen", "delivery was fast", "the material feels solid",
                   "it is very light"],
    "review_con": ["the instructions are confusing", "it gets warm after an hour", "the color faded after a month",
                   "it is louder than I expected", "the cable is too short", "it scratches easily"],
    "review_item": ["wireless speaker", "electric kettle", "backpack", "fitness tracker", "desk lamp",
                    "robot vacuum", "office chair"],
    # qa
    "country": ["France", "Japan", "Canada", "Brazil", "Kenya", "Norway", "Egypt", "Argentina", "Vietnam",
                "Portugal", "New Zealand", "Mexico", "Turkey", "Poland", "Chile", "Thailand", "Morocco", "Ireland",
                "South Korea", "Peru"],
    "science_concept": ["gravity", "photosynthesis", "evolution", "inflation", "DNA", "an atom", "a black hole",
                        "the greenhouse effect", "machine learning", "blockchain", "a vaccine", "the water cycle",
                        "supply and demand", "an electric circuit", "compound interest", "a neural network",
                        "plate tectonics", "an antibiotic", "the immune system", "democracy", "GPS",
                        "renewable energy", "a recession", "an algorithm"],
    "phenomenon": ["ice floats on water", "the moon seems to change shape", "leaves change color in autumn",
                   "we have seasons", "bread rises", "onions make you cry", "cats purr", "the ocean tastes salty",
                   "we yawn", "metal feels colder than wood", "planes can stay in the air", "we get hiccups",
                   "the sea has tides", "stars twinkle"],
    "thing_work": ["a refrigerator", "a microwave oven", "the internet", "a credit card payment", "a solar panel",
                   "a search engine", "an electric car battery", "Wi-Fi", "a thermostat", "a touchscreen",
                   "a compass", "email", "a heat pump"],
    "qa_pair": ["a virus and a bacterium", "a crocodile and an alligator", "RAM and storage",
                "a simile and a metaphor", "speed and velocity", "a comet and an asteroid", "stocks and bonds",
                "baking soda and baking powder", "a hurricane and a tornado", "empathy and sympathy",
                "a lake and a pond", "latitude and longitude"],
    "food": ["green tea", "oatmeal", "spinach", "dark chocolate", "bananas", "walnuts", "yogurt", "lentils",
             "blueberries", "olive oil"],
    "tip_topic": ["learning a new language", "saving money on groceries", "staying focused while studying",
                  "preparing for a job interview", "keeping houseplants alive", "running my first 5k",
                  "public speaking", "reducing screen time", "cooking for one person", "making friends in a new city"],
    "myth": ["we only use 10% of our brains", "goldfish have a three-second memory",
             "lightning never strikes the same place twice", "bats are blind",
             "cracking your knuckles causes arthritis", "the Great Wall of China is visible from space",
             "bulls hate the color red"],
    "life_event": ["adopting a dog", "buying a used car", "moving to another country", "starting a small business",
                   "renting my first apartment", "going on a long hike"],
    "cause_topic": ["earthquakes", "rainbows", "thunder", "jet lag", "rust", "muscle cramps", "the northern lights",
                    "headaches", "traffic jams"],
    "fact_q": ["How many planets are in our solar system?", "How many continents are there?",
               "How long does light from the Sun take to reach Earth?", "What is the largest ocean on Earth?",
               "What is the tallest mountain in the world?", "Who painted the Mona Lisa?",
               "Who invented the telephone?", "When did people first walk on the moon?",
               "What language is spoken in Brazil?", "What is the boiling point of water in Fahrenheit?",
               "What is the chemical symbol for gold?", "What is the longest river in Africa?",
               "Who was Marie Curie?", "What does DNA stand for?", "What is the smallest country in the world?",
               "How many bones are in the adult human body?", "What is the fastest land animal?"],
    "job": ["nurse", "carpenter", "teacher", "photographer", "pilot", "chef", "librarian", "engineer"],
    "field": ["biology", "music", "architecture", "history", "chemistry", "economics"],
    "business": ["a small bakery", "a bike repair shop", "a bookstore", "a language school", "a flower shop"],
    # translation
    "en_sentence": [
        "Could you tell me how to get to the airport?", "I am allergic to peanuts.", "How much does this jacket cost?",
        "We need a table for four people, please.", "The meeting has been moved to Thursday afternoon.",
        "Please close the window, it is cold in here.", "I have been learning to play the guitar for two years.",
        "What time does the museum open on Sundays?", "Can I pay by credit card?", "My phone battery is almost empty.",
        "The children are playing in the garden.", "I'm sorry, I don't understand. Could you speak more slowly?",
        "Our flight was delayed by three hours.", "Do you have any rooms available for tonight?",
        "The library is closed on public holidays.", "I would like to book an appointment for next week.",
        "It has been raining all day.", "She speaks three languages fluently.",
        "Happy birthday! I hope all your wishes come true.", "Please send me the report before Friday.",
        "The soup is too salty.", "Where can I buy a ticket for the bus?",
        "He is reading a book about ancient history.", "We are planning a trip to the mountains this summer.",
        "I think I left my bag on the train.", "Turn left at the second traffic light.",
        "The store opens at nine in the morning.", "Don't forget to water the plants.",
        "My favorite season is spring because everything is green.", "Can you recommend a good restaurant nearby?",
        "{subj} {past_vp} {past_time}.", "{subj} {past_vp} {past_time}.", "{subj} {past_vp} {past_time}.",
        "{subj} {past_vp} {past_time}.", "{subj} {past_vp} {past_time}.", "{subj} {past_vp} {past_time}.",
    ],
    "subj": ["My brother", "Our neighbor", "The teacher", "My grandmother", "The little girl", "Our manager",
             "The taxi driver", "My best friend", "The old man", "The new student", "My aunt", "The waiter"],
    "past_vp": ["bought fresh bread at the bakery", "visited the art museum", "missed the last bus",
                "cooked a big dinner for everyone", "lost the car keys", "painted the kitchen blue",
                "read three books", "walked to the beach", "forgot the umbrella at the restaurant",
                "found a wallet on the street", "called the doctor", "planted tomatoes in the garden",
                "wrote a long letter", "fixed the old bicycle", "ordered a pizza", "sang at the wedding"],
    "past_time": ["yesterday", "last weekend", "this morning", "two days ago", "on Friday evening", "last summer"],
    # sql
    "sql_pair": ["WHERE and HAVING", "UNION and UNION ALL", "DELETE and TRUNCATE", "a primary key and a foreign key",
                 "CHAR and VARCHAR", "a view and a table", "GROUP BY and ORDER BY", "RANK and DENSE_RANK",
                 "COUNT(*) and COUNT(column)", "a subquery and a join", "a clustered and a non-clustered index"],
    "sql_concept": ["GROUP BY", "a LEFT JOIN", "a CTE (WITH clause)", "COALESCE", "a window function",
                    "a transaction", "an index", "DISTINCT", "CASE WHEN", "a self join", "normalization",
                    "a foreign key constraint", "a correlated subquery", "EXPLAIN"],
    "sql_howto": ["rename a column", "add a column with a default value", "get the current date",
                  "paginate query results", "export a table to CSV", "concatenate two columns",
                  "get the id of the last inserted row", "change a column's type", "remove duplicate rows",
                  "copy a table"],
    # api_call
    "http_status": ["200", "201", "204", "301", "400", "401", "403", "409", "422", "429", "500", "502", "503"],
    "api_concept": ["a REST API", "an API key", "OAuth 2.0", "rate limiting", "pagination in an API",
                    "a webhook", "idempotency", "JSON Schema", "GraphQL", "API versioning", "a bearer token",
                    "CORS"],
    "api_problem": ["timeouts", "rate limits (HTTP 429)", "expired access tokens", "paginated results",
                    "network errors", "large file uploads", "retries for POST requests"],
    # legal
    "legal_term": ["indemnification", "liquidated damages", "severability", "governing law", "arbitration",
                   "consideration", "breach of contract", "statute of limitations", "due diligence",
                   "power of attorney", "fair use", "joint and several liability", "escrow", "tort", "pro rata",
                   "good faith", "material breach", "sublease", "waiver", "assignment"],
    "legal_pair": ["a will and a trust", "a misdemeanor and a felony", "a patent and a trade secret",
                   "an LLC and a corporation", "mediation and arbitration", "a lease and a rental agreement",
                   "civil law and criminal law", "an employee and an independent contractor",
                   "a warranty and a guarantee", "libel and slander"],
    "clause_type": ["termination", "payment terms", "non-disclosure", "limitation of liability",
                    "intellectual property", "dispute resolution", "non-solicitation", "warranty", "governing law",
                    "late payment", "cancellation", "data protection"],
    "contract_type": ["a residential lease", "a freelance web development contract", "an employment agreement",
                      "a software license agreement", "a consulting agreement", "a photography services contract",
                      "a used car sale agreement", "an event venue rental agreement", "a partnership agreement",
                      "a subscription service agreement"],
    "legal_doc": ["a power of attorney", "a living will", "a non-disclosure agreement", "a cease and desist letter",
                  "a memorandum of understanding", "a privacy policy", "a prenuptial agreement"],
    "party_role": ["tenant", "landlord", "freelancer", "employee", "buyer", "licensee", "subscriber"],
    "jurisdiction": ["the State of New York", "England and Wales", "the Province of Ontario", "the State of California",
                     "Ireland"],
    # customer support
    "cs_issue": ["can't log into my account even with the right password",
                 "didn't get a confirmation email for my order", "was charged after I canceled my free trial",
                 "received someone else's package", "can't find where to change my shipping address",
                 "keep getting an error when I try to pay", "have been waiting on hold for an hour",
                 "got a damaged item", "want to return shoes that are too small",
                 "lost my order confirmation number", "was sent the wrong color"],
    "cs_howto": ["change the email address on my account", "update my credit card", "track my package",
                 "return an item I bought online", "delete my account", "download my invoice",
                 "change my delivery date", "apply a discount code", "upgrade my plan",
                 "turn off email notifications"],
    "remedy": ["a full refund", "a replacement", "a 20% discount on the next order", "free express shipping",
               "store credit"],
    "announcement": ["our website will be down for maintenance on Sunday night",
                     "shipping will be delayed by two days because of a storm", "prices will increase next month",
                     "we are moving to a new warehouse", "the mobile app has a new login screen",
                     "some orders were shipped with the wrong label", "our store hours are changing for the holidays"],
    "faq": ["What is your return policy?", "How long does shipping take?", "Do you ship internationally?",
            "Can I change my order after placing it?", "How do I contact customer service?",
            "Are my payment details secure?", "Do you offer gift cards?"],
    "business_role": ["store manager", "hotel manager", "owner of the bakery", "support team lead",
                      "manager of the gym"],
    "review_text": ["The staff were friendly, but the room was not clean when we arrived.",
                    "Great prices, but my order took three weeks to arrive.",
                    "The class was fun, but the changing rooms were always crowded.",
                    "I love the bread here, but the line is always too long.",
                    "Support answered quickly but didn't actually solve my problem.",
                    "The product is fine, but the packaging was damaged."],
    "situation": ["is angry about a late delivery", "wants a refund outside the return window", "keeps interrupting",
                  "reports a bug you can't reproduce", "asks to speak to a manager",
                  "threatens to leave a bad review", "is confused by their bill"],
    "cs_product": ["laptop stand", "pair of running shoes", "coffee grinder", "winter coat", "phone case",
                   "set of kitchen knives", "yoga mat", "desk lamp", "bluetooth speaker", "backpack"],
    "cs_problem": ["it arrived with a cracked part", "it still hasn't been delivered", "you sent the wrong size",
                   "one of the pieces is missing", "it broke after two days", "I was charged twice",
                   "the color is different from the picture on your website"],
    "cs_extra": ["This is really frustrating.", "I have already contacted you twice.",
                 "I need it before the weekend.", "Could you please help?", "I would like a refund.",
                 "Please tell me what my options are.", ""],
    "time_ago": ["last week", "ten days ago", "a month ago", "on Monday", "three weeks ago"],
}

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "code": (
        "Write a {lang} function to {code_task}.",
        "How do I {code_task} in {lang}?",
        "how can i {code_task} in {lang}? please keep it simple",
        "Show me a short {lang} example of how to {code_task}.",
        "I'm new to programming. Can you explain step by step how to {code_task} in {lang}?",
        "Write a {lang} program to {code_task}, with comments explaining each step.",
        "What's the most efficient way to {code_task} in {lang}? Explain the time complexity.",
        "Write unit tests for a function meant to {code_task}.",
        "Explain {concept} in {lang} with a short example.",
        "What are {concept} good for in programming, and when should I avoid them?",
        "What is the difference between {py_pair} in Python?",
        "I get this error: {py_error}. What does it mean and how do I fix it?",
        "My program fails with \"{py_error}\". What are the usual causes?",
        "Write a {lang} class for a {entity} with {attr} and {attr2} fields and a method that prints it.",
        "Design a simple class hierarchy for a {entity} system in {lang}.",
        "Write a regular expression that matches {regex_target} and explain how it works.",
        "Write a {lang} one-liner to {code_task}.",
        "Write pseudocode to {code_task}, then implement it in {lang}.",
        "I want to {code_task}. My idea is to loop over everything twice. Is there a better way in {lang}?",
        "Give me two different ways to {code_task} in {lang} and compare them.",
    ),
    "creative_writing": (
        "Write a {form} about {subject}.",
        "Write a {tone} {form} about {subject}.",
        "Can you write a {form} about {subject} for {audience}?",
        "Tell me a story about {character} who {char_goal}.",
        "Write a short {genre} story about {character} who {char_goal}.",
        "Write the opening paragraph of a {genre} story set in {setting}.",
        "Continue this story: {time_phrase}, {character} {story_event}.",
        "Continue the story for two more paragraphs:\n\n{time_phrase}, {character} {story_event}.",
        "Write a dialogue between {character} and {character2} about {subject}.",
        "Describe {setting} using all five senses.",
        "Write a {tone} toast for {occasion}.",
        "Come up with five creative names for {naming_target}.",
        "Rewrite this sentence to make it more {style_adj}: {plain_sentence}",
        "Write a short {form} from the point of view of {pov_object}.",
        "Write a product description for {product} in the style of {style}.",
        "Give me three writing prompts for a {genre} story set in {setting}.",
        "Write a letter from {character} to {character2} explaining {letter_topic}.",
        "write me a {form} about {subject}, make it rhyme",
        "Write a {tone} story in exactly five sentences about {subject}.",
        "Describe {character} in one paragraph, showing their personality through what they do.",
        "Write a scene where {character} meets {character2} in {setting}.",
    ),
    "summarization": (
        "Summarize the plot of {famous_work} {sum_format}.",
        "Give me a short summary of the history of {history_topic}.",
        "Summarize the main arguments for and against {debate_topic}.",
        "What is {famous_work} about? Keep it short.",
        "Summarize these {team} team meeting notes {sum_format}:\n- {note_item}\n- {note_item2}\n- {note_item3}",
        "Turn these notes into a two-sentence update for the whole company:\n- {note_item}\n- {note_item2}"
        "\n- {note_item3}\n- {note_item4}",
        "Summarize this news report {sum_format}:\n\n{city} {news_event}. {news_detail} {news_detail2}",
        "Summarize this customer review {sum_format}:\n\nI bought this {review_item} {time_ago}. The good: "
        "{review_pro} and {review_pro2}. The bad: {review_con}. Overall I would buy it again, but only on sale.",
        "Give me the main points of this review:\n\nMy new {review_item} is okay. On the plus side, {review_pro}. "
        "On the other hand, {review_con}, and {review_con2}.",
        "Explain the key idea of {famous_work} {sum_format}.",
    ),
    "qa": (
        "What is the capital of {country}?",
        "What language do people speak in {country}?",
        "What is {country} famous for?",
        "What is {science_concept}?",
        "Can you explain {science_concept} in simple terms?",
        "Explain {science_concept} like I'm five.",
        "Can you explain why {phenomenon}?",
        "I've always wondered why {phenomenon}. Can you explain?",
        "How does {thing_work} work?",
        "What is the difference between {qa_pair}?",
        "What are the health benefits of {food}?",
        "{fact_q}",
        "Quick question: {fact_q}",
        "Give me {num_small} tips for {tip_topic}.",
        "Is it true that {myth}?",
        "What should I know before {life_event}?",
        "What causes {cause_topic}?",
        "Read the text and answer the question.\n\n{person} was born in {city}, studied {field}, and worked as a "
        "{job} for {num_small} years before opening {business} in {city2}.\n\nQuestion: Where did {person} open "
        "{business}?",
        "Based on this text, what did {person} study?\n\n{person} grew up in {city}. After studying {field}, "
        "{person} worked as a {job} and later moved to {city2} to open {business}.",
        "According to the passage, how long did {person} work as a {job}?\n\n{person} studied {field} in {city} and "
        "then worked as a {job} for {num_small} years. Today {person} runs {business}.",
    ),
    "translation": (
        "Translate to {tlang}: {en_sentence}",
        "How do you say \"{en_sentence}\" in {tlang}?",
        "Please translate the following into {tlang}:\n\n{en_sentence}",
        "Translate this into formal {tlang}: {en_sentence}",
        "What is the {tlang} translation of \"{en_sentence}\"?",
        "Translate into {tlang} and explain any tricky grammar: {en_sentence}",
        "Can you translate this text into {tlang}?\n\n{en_sentence} {en_sentence2}",
        "Translate to {tlang} and {tlang2}: {en_sentence}",
        "translate to {tlang} pls: {en_sentence}",
        "I'm writing to a friend. How would I say this in {tlang}? \"{en_sentence}\"",
    ),
    "sql": (
        "What is the difference between {sql_pair} in SQL?",
        "Explain what {sql_concept} does in SQL, with an example.",
        "How do I {sql_howto} in {dialect}?",
        "When should I use {sql_concept} in {dialect}?",
        "What is the difference between {sql_pair}? Show a small example for each.",
    ),
    "api_call": (
        "What does HTTP status code {http_status} mean, and how should a client handle it?",
        "Explain {api_concept} in simple terms.",
        "How should I handle {api_problem} when calling a REST API from {lang}?",
        "What is {api_concept}, and why would an API use it?",
        "Write a small {lang} helper that calls a JSON API and handles {api_problem}.",
    ),
    "legal": (
        "What does \"{legal_term}\" mean in a contract?",
        "Explain the difference between {legal_pair}.",
        "Draft a short {clause_type} clause for {contract_type}.",
        "What should I check before signing {contract_type}?",
        "What is usually included in {contract_type}?",
        "In general terms, what rights does a {party_role} usually have under {contract_type}?",
        "Explain what {legal_doc} is and when someone might need one.",
        "Why do contracts include a {clause_type} clause?",
        "Explain {legal_term} with a simple example.",
    ),
    "customer_support": (
        "I {cs_issue}. What should I do?",
        "Hi, I {cs_issue}. Can you help me?",
        "How do I {cs_howto}?",
        "How can I {cs_howto} on your website?",
        "Write a short message telling customers that {announcement}.",
        "Write an email to customers explaining that {announcement}, and apologize for the inconvenience.",
        "Write a FAQ answer for the question: \"{faq}\"",
        "Respond to this review as the {business_role}: \"{review_text}\"",
        "What's a good way to respond to a customer who {situation}?",
        "Write a short script for a support agent talking to a customer who {situation}.",
        "Write a polite reply to a customer who says they {cs_issue}.",
    ),
    "math": (),
}

_SLOT_RE = re.compile(r"\{([a-z][a-z_]*?)(\d*)\}")
_ARTICLE_RE = re.compile(r"\b([Aa]) (?=(?!one\b|eu)[aeioAEIO])")


def _fill(template: str, rng: random.Random, _depth: int = 0) -> str:
    """Replace each {slot} with a value from _SLOTS (values may contain slots themselves).

    The same slot name gets the same value throughout `template`; {x} and {x2} get different values.
    """
    used: dict[str, set[str]] = {}
    chosen: dict[str, str] = {}

    def sub(m: re.Match[str]) -> str:
        if m.group(0) in chosen:
            return chosen[m.group(0)]
        base = m.group(1)
        pool = _SLOTS[base]
        taken = used.setdefault(base, set())
        value = rng.choice(pool)
        for _ in range(8):
            if value not in taken:
                break
            value = rng.choice(pool)
        taken.add(value)
        if "{" in value and _depth < 3:
            value = _fill(value, rng, _depth + 1)
        chosen[m.group(0)] = value
        return value

    out = _SLOT_RE.sub(sub, template)
    return out if _depth else _ARTICLE_RE.sub(r"\1n ", out)


# --------------------------------------------------------------------------------------
# Offline corpora: the standard library and /usr/share/doc.
# --------------------------------------------------------------------------------------

_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled",
                     "turtledemo", "lib2to3", "__phello__", "ensurepip"}
_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")


@dataclass(frozen=True)
class _Func:
    """A function or method taken from the standard library."""

    module: str
    name: str
    source: str
    source_nodoc: str
    annotated: bool
    doc_first: str
    params: tuple[tuple[str, str], ...]
    top_level: bool


@dataclass(frozen=True)
class _ParsedFile:
    functions: tuple[_Func, ...]
    module_doc: str
    sentences: tuple[str, ...]


@dataclass
class _Corpora:
    """What the offline sources yielded for one generation run."""

    functions: list[_Func] = field(default_factory=list)
    api_funcs: list[_Func] = field(default_factory=list)
    module_docs: list[tuple[str, str]] = field(default_factory=list)
    sentences: list[str] = field(default_factory=list)
    license_paras: list[str] = field(default_factory=list)
    readme_chunks: list[tuple[str, str]] = field(default_factory=list)
    changelog_entries: list[tuple[str, str]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def has(self, key: str | None) -> bool:
        return key is None or bool(getattr(self, key))


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[str, ...]:
    """Sorted .py files of the standard library, without tests, demos and third-party packages."""
    root = _stdlib_root()
    if not root.is_dir():
        return ()
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-"))
        for fn in sorted(filenames):
            if fn.endswith(".py") and not fn.startswith("test_"):
                out.append(os.path.relpath(os.path.join(dirpath, fn), root))
    return tuple(sorted(out))


def _module_name(rel: str) -> str:
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _trim(text: str, limit: int = _MAX_CHUNK) -> str:
    """Whole paragraphs of `text` up to about `limit` characters."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    out: list[str] = []
    size = 0
    for p in paras:
        if out and size + len(p) > limit:
            break
        out.append(p[:limit])
        size += len(p) + 2
    return "\n\n".join(out)


def _annotation_type(arg: ast.arg, default: ast.expr | None) -> str:
    if arg.annotation is not None:
        return ast.unparse(arg.annotation)
    if isinstance(default, ast.Constant):
        v = default.value
        for py, js in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
            if isinstance(v, py):
                return js
    return "any"


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[tuple[str, str], ...]:
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    out = [(p.arg, _annotation_type(p, d)) for p, d in zip(positional, defaults) if p.arg not in ("self", "cls")]
    out += [(p.arg, _annotation_type(p, d)) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    return tuple(out)


_SENTENCE_OK = re.compile(r"^[A-Z][A-Za-z ,'-]+[.]$")


@lru_cache(maxsize=4096)
def _parse_stdlib_file(rel: str) -> _ParsedFile:
    """Functions, module docstring and plain sentences from one stdlib file (parsed, never imported)."""
    path = _stdlib_root() / rel
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(4 * _MAX_READ)
        tree = ast.parse(text)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
        return _ParsedFile((), "", ())
    module = _module_name(rel)
    lines = text.splitlines()
    funcs: list[_Func] = []
    sentences: list[str] = []
    candidates: list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, bool]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            candidates.append((node, True))
        elif isinstance(node, ast.ClassDef):
            doc = ast.get_docstring(node) or ""
            sentences += _plain_sentences(doc)
            candidates += [(n, False) for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node, top in candidates:
        if node.name.startswith("__") or node.end_lineno is None:
            continue
        start = node.lineno - 1
        src_lines = lines[start:node.end_lineno]
        src = textwrap.dedent("\n".join(src_lines)).strip("\n")
        if not (120 <= len(src) <= 1000) or len(src_lines) > 30 or "\t" in src:
            continue
        doc = ast.get_docstring(node) or ""
        sentences += _plain_sentences(doc)
        nodoc = src
        first = node.body[0]
        if doc and isinstance(first, ast.Expr) and first.end_lineno is not None and first.lineno > node.lineno:
            keep = lines[start:first.lineno - 1] + lines[first.end_lineno:node.end_lineno]
            nodoc = textwrap.dedent("\n".join(keep)).strip("\n")
        annotated = node.returns is not None or any(
            p.annotation is not None for p in node.args.posonlyargs + node.args.args + node.args.kwonlyargs)
        first_line = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
        funcs.append(_Func(module, node.name, _scrub(src), _scrub(nodoc), annotated, first_line[:200], _params(node), top))
    mdoc = ast.get_docstring(tree) or ""
    mdoc = _trim(_scrub(mdoc)) if len(mdoc) >= 150 else ""
    return _ParsedFile(tuple(funcs), mdoc, tuple(dict.fromkeys(sentences)))


def _plain_sentences(doc: str) -> list[str]:
    """Short plain-English sentences from a docstring (for translation prompts)."""
    text = " ".join(doc.split("\n\n")[0].split())
    out = []
    for s in re.split(r"(?<=[.])\s+", text):
        if 40 <= len(s) <= 160 and _SENTENCE_OK.match(s) and len(s.split()) >= 7:
            out.append(s)
    return out


def _read_text(path: Path) -> str:
    """First _MAX_READ bytes of a text file, gunzipped if it ends in .gz; '' if unreadable."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read(_MAX_READ)
        else:
            with open(path, "rb") as f:
                data = f.read(_MAX_READ)
    except (OSError, EOFError):
        return ""
    if b"\0" in data:
        return ""
    return data.decode("utf-8", errors="replace")


def _scrub(text: str) -> str:
    return _EMAIL_RE.sub("<email>", text)


_LEGAL_WORDS = re.compile(r"\b(shall|warrant|permission|licen[cs]e|liab|redistribut|notice|copyright|terms)", re.I)


def _license_paragraphs(text: str) -> list[str]:
    """License paragraphs of a (possibly DEP-5) copyright file, joined into single lines."""
    paras: list[str] = []
    cur: list[str] = []
    for line in text.splitlines():
        s = line.strip()
        header = bool(re.match(r"^[A-Za-z][A-Za-z-]*:(\s|$)", line))
        if not s or s == "." or header or set(s) <= set("-=*#"):
            if cur:
                paras.append(" ".join(cur))
            cur = []
            continue
        cur.append(s)
    if cur:
        paras.append(" ".join(cur))
    out = []
    for p in paras:
        p = " ".join(p.split())
        if not (200 <= len(p) <= _MAX_CHUNK) or not _LEGAL_WORDS.search(p):
            continue
        if p.lower().startswith("copyright") or "http" in p[:20] or "@" in p:
            continue
        letters = sum(c.isalpha() for c in p)
        if letters < 0.7 * len(p):
            continue
        out.append(p)
    return out


def _readme_chunk(text: str) -> str:
    """A prose-like chunk (several paragraphs) near the start of a README, or ''."""
    text = _scrub(text.replace("\r", ""))
    good: list[str] = []
    for p in re.split(r"\n\s*\n", text):
        p = p.strip()
        flat = " ".join(p.split())
        if len(flat) < 80 or sum(c.isalpha() or c.isspace() for c in flat) < 0.85 * len(flat):
            if good:
                break
            continue
        good.append(p)
        if sum(len(g) for g in good) > 400:
            break
    chunk = _trim("\n\n".join(good))
    return chunk if 250 <= len(chunk) <= _MAX_CHUNK else ""


def _changelog_entries(text: str, limit: int = 3) -> list[tuple[str, str]]:
    """The first `limit` entries of a Debian changelog as (package version, change list)."""
    out: list[tuple[str, str]] = []
    for block in re.split(r"\n(?=\S+ \([^)]+\) [^;]+; urgency=)", text):
        head, _, body = block.partition("\n")
        m = re.match(r"(\S+) \(([^)]+)\)", head)
        if not m:
            continue
        changes = "\n".join(ln.rstrip() for ln in body.splitlines() if ln.strip() and not ln.startswith(" -- "))
        changes = _scrub(textwrap.dedent(changes)).strip()
        if 120 <= len(changes) <= _MAX_CHUNK:
            out.append((f"{m.group(1)} {m.group(2)}", changes))
        if len(out) >= limit:
            break
    return out


@lru_cache(maxsize=1)
def _doc_files() -> dict[str, tuple[str, ...]]:
    """Sorted candidate files under /usr/share/doc ({} parts empty when absent)."""
    empty: dict[str, tuple[str, ...]] = {"copyright": (), "readme": (), "changelog": ()}
    if not DOC_ROOT.is_dir():
        return empty
    try:
        pkgs = sorted(p for p in DOC_ROOT.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return empty
    copyright_, readme, changelog = [], [], []
    for pkg in pkgs:
        if (pkg / "copyright").is_file():
            copyright_.append(str(pkg / "copyright"))
        for name in ("README", "README.md", "README.txt", "README.gz", "README.md.gz", "README.txt.gz"):
            if (pkg / name).is_file():
                readme.append(str(pkg / name))
                break
        if (pkg / "changelog.Debian.gz").is_file():
            changelog.append(str(pkg / "changelog.Debian.gz"))
    return {"copyright": tuple(copyright_), "readme": tuple(readme), "changelog": tuple(changelog)}


def _sample(items: tuple[str, ...], k: int, rng: random.Random) -> list[str]:
    return sorted(rng.sample(items, min(k, len(items))))


def _load_corpora(n_per_task: int, seed: int) -> _Corpora:
    """Parse a seed-chosen subset of the stdlib and /usr/share/doc, sized to n_per_task."""
    c = _Corpora()
    rng = random.Random(f"specdeploy-corpora:{seed}")
    files = _stdlib_files()
    picked = _sample(files, min(400, 24 + n_per_task // 2), rng)
    seen_sent: set[str] = set()
    for rel in picked:
        parsed = _parse_stdlib_file(rel)
        c.functions += parsed.functions
        c.api_funcs += [f for f in parsed.functions
                        if f.top_level and f.doc_first and f.params and not f.name.startswith("_")]
        if parsed.module_doc:
            c.module_docs.append((_module_name(rel), parsed.module_doc))
        for s in parsed.sentences:
            if s not in seen_sent:
                seen_sent.add(s)
                c.sentences.append(s)
    c.stats["stdlib"] = {
        "root": str(_stdlib_root()),
        "python": sys.version.split()[0],
        "files_available": len(files),
        "files_parsed": len(picked),
        "functions": len(c.functions),
        "api_functions": len(c.api_funcs),
        "module_docs": len(c.module_docs),
        "sentences": len(c.sentences),
    }

    docs = _doc_files()
    k = min(300, 24 + n_per_task // 2)
    seen_para: set[str] = set()
    for path in _sample(docs["copyright"], k, rng):
        for p in _license_paragraphs(_read_text(Path(path))):
            key = p.casefold()
            if key not in seen_para:
                seen_para.add(key)
                c.license_paras.append(p)
    for path in _sample(docs["readme"], k, rng):
        chunk = _readme_chunk(_read_text(Path(path)))
        if chunk:
            c.readme_chunks.append((Path(path).parent.name, chunk))
    for path in _sample(docs["changelog"], k, rng):
        c.changelog_entries += _changelog_entries(_read_text(Path(path)))
    c.stats["usr_share_doc"] = {
        "root": str(DOC_ROOT),
        "present": DOC_ROOT.is_dir(),
        "copyright_files_available": len(docs["copyright"]),
        "readme_files_available": len(docs["readme"]),
        "changelog_files_available": len(docs["changelog"]),
        "files_sampled_per_kind": k,
        "license_paragraphs": len(c.license_paras),
        "readme_chunks": len(c.readme_chunks),
        "changelog_entries": len(c.changelog_entries),
    }
    return c


# --------------------------------------------------------------------------------------
# Generators: (rng, corpora) -> prompt text or None.
# --------------------------------------------------------------------------------------

_Gen = Callable[[random.Random, _Corpora], "str | None"]


def _from_templates(task: str) -> _Gen:
    def gen(rng: random.Random, c: _Corpora) -> str:
        return _fill(rng.choice(_TEMPLATES[task]), rng)

    gen.n_templates = len(_TEMPLATES[task])  # type: ignore[attr-defined]
    return gen


def _fenced(src: str, rng: random.Random) -> str:
    return f"```python\n{src}\n```" if rng.random() < 0.5 else src


_CODE_FUNC_TEMPLATES = (
    "Explain what this function does:\n\n{src}",
    "Write a docstring for this function:\n\n{nodoc}",
    "Refactor this code to make it easier to read. Keep the behaviour the same.\n\n{src}",
    "Write pytest unit tests for the following function:\n\n{src}",
    "Are there any edge cases this function doesn't handle?\n\n{src}",
    "Rewrite this Python function in {lang}:\n\n{src}",
    "Add helpful comments to this code:\n\n{nodoc}",
    "What is the time complexity of this function? Explain briefly.\n\n{src}",
    "Walk me through this function line by line:\n\n{src}",
    "This function is from Python's `{module}` module. What is it used for?\n\n{src}",
    "can you simplify this?\n\n{src}",
    "Rename the variables in this function so the code is easier to understand:\n\n{nodoc}",
)


def _gen_code_stdlib(rng: random.Random, c: _Corpora) -> str:
    f = rng.choice(c.functions)
    if not f.annotated and rng.random() < 0.25:
        tpl = "Add type hints to this function:\n\n{nodoc}"
    else:
        tpl = rng.choice(_CODE_FUNC_TEMPLATES)
    head = tpl.split("\n\n")[0].replace("{module}", f.module)
    if "{lang}" in head:
        head = _fill(head, rng)
    body = f.source_nodoc if "{nodoc}" in tpl else f.source
    return f"{head}\n\n{_fenced(body, rng)}"


def _gen_code_loop(rng: random.Random, c: _Corpora) -> str:
    var, seq = rng.choice([("x", "numbers"), ("word", "words"), ("item", "items"), ("n", "values"),
                           ("name", "names"), ("p", "prices")])
    cond = rng.choice([f"{var} > {rng.randint(0, 50)}", f"{var} % 2 == 0", f"len(str({var})) > {rng.randint(2, 6)}",
                       f"{var} is not None", f"{var} != {rng.randint(0, 9)}"])
    expr = rng.choice([var, f"{var} * {rng.randint(2, 9)}", f"str({var})", f"({var}, {var})", f"{var} ** 2"])
    code = f"result = []\nfor {var} in {seq}:\n    if {cond}:\n        result.append({expr})"
    ask = rng.choice(["Convert this loop into a list comprehension:", "Can this be written in one line?",
                      "Rewrite this using filter and map instead:", "Explain what this code does:",
                      _fill("Rewrite this Python code in {lang}:", rng)])
    return f"{ask}\n\n{code}"


def _gen_summ_stdlib(rng: random.Random, c: _Corpora) -> str:
    mod, doc = rng.choice(c.module_docs)
    head = rng.choice([
        _fill("Summarize this documentation {sum_format}:", rng),
        f"Here is the docstring of Python's `{mod}` module. Summarize it:",
        "What are the key points of this text?",
        "Give me a TL;DR of this documentation:",
        f"Summarize what the `{mod}` module does, based on its documentation:",
    ])
    return f"{head}\n\n{doc}"


def _gen_summ_readme(rng: random.Random, c: _Corpora) -> str:
    pkg, chunk = rng.choice(c.readme_chunks)
    head = rng.choice([
        "Summarize this README section:", f"Give me a short overview of `{pkg}` based on this text:",
        _fill("Summarize the following text {sum_format}:", rng), "What is this document about? Summarize it.",
    ])
    return f"{head}\n\n{chunk}"


def _gen_summ_changelog(rng: random.Random, c: _Corpora) -> str:
    version, changes = rng.choice(c.changelog_entries)
    head = rng.choice([
        f"Summarize the changes in {version} from this changelog:", "Summarize this changelog entry in plain English:",
        "Write short release notes for users based on this changelog:",
        "Which problems were fixed according to this changelog? Summarize briefly.",
    ])
    return f"{head}\n\n{changes}"


def _gen_qa_stdlib(rng: random.Random, c: _Corpora) -> str | None:
    if c.api_funcs and rng.random() < 0.4:
        f = rng.choice(c.api_funcs)
        return rng.choice([f"What does the Python function `{f.module}.{f.name}` do?",
                           f"When would I use `{f.module}.{f.name}` in Python? Give an example.",
                           f"What arguments does `{f.module}.{f.name}` take?"])
    if not c.module_docs:
        return None
    mod, doc = rng.choice(c.module_docs)
    return rng.choice([
        f"Based on this documentation, what is the Python `{mod}` module used for?\n\n{doc}",
        f"Read this and answer: what problem does the `{mod}` module solve?\n\n{doc}",
        f"When would I use the `{mod}` module in Python? Give an example.",
        f"According to the text below, what can the `{mod}` module do?\n\n{doc}",
    ])


_FOREIGN = (
    ("French", "Où se trouve la bibliothèque ?"), ("French", "Nous allons au marché tous les samedis."),
    ("French", "Il fait très froid ce matin."), ("French", "Je voudrais réserver une chambre pour deux nuits."),
    ("French", "Mon frère travaille dans une banque."), ("French", "C'est une bonne idée."),
    ("Spanish", "¿Dónde está el baño?"), ("Spanish", "Mañana vamos a la playa con mis primos."),
    ("Spanish", "No me gusta el café sin azúcar."), ("Spanish", "El tren sale a las ocho y media."),
    ("Spanish", "Mi madre cocina muy bien."), ("Spanish", "¿Puedes hablar más despacio, por favor?"),
    ("German", "Wie spät ist es?"), ("German", "Ich wohne seit fünf Jahren in Berlin."),
    ("German", "Das Essen war sehr lecker."), ("German", "Kannst du mir bitte helfen?"),
    ("German", "Wir haben am Wochenende einen Ausflug gemacht."),
    ("Italian", "Vorrei un bicchiere d'acqua, per favore."), ("Italian", "La stazione è vicino al centro."),
    ("Portuguese", "Obrigado pela ajuda."), ("Portuguese", "Onde fica o supermercado mais próximo?"),
)


def _gen_translation_foreign(rng: random.Random, c: _Corpora) -> str:
    lang, s = rng.choice(_FOREIGN)
    other = rng.choice([x for x in _SLOTS["tlang"] if x != lang])
    return rng.choice([
        f"Translate into English: {s}", f"What does \"{s}\" mean in English?",
        f"I saw this {lang} sentence: \"{s}\" What does it mean?", f"Translate this {lang} sentence into {other}: {s}",
        f"Translate from {lang} to English and explain the grammar: {s}",
    ])


def _gen_translation_stdlib(rng: random.Random, c: _Corpora) -> str:
    s = rng.choice(c.sentences)
    lang = rng.choice(_SLOTS["tlang"])
    return rng.choice([
        f"Translate this technical sentence into {lang}: {s}",
        f"Translate to {lang}, keeping technical terms in English:\n\n{s}",
        f"How would you say this in {lang}? \"{s}\"",
    ])


def _money(rng: random.Random, lo: int, hi: int) -> str:
    return f"${rng.randint(lo, hi)}" if rng.random() < 0.6 else f"${rng.randint(lo, hi)}.{rng.choice(['50', '99', '25'])}"


def _gen_math(rng: random.Random, c: _Corpora) -> str:
    """One of ~20 kinds of arithmetic / algebra / geometry / word problems with random numbers."""
    r = rng.randint
    kind = r(0, 21)
    name, name2 = rng.sample(_SLOTS["person"], 2)
    if kind == 0:
        p, x = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 75]), r(2, 80) * 10
        return rng.choice([f"What is {p}% of {x}?", f"Calculate {p} percent of {x}.", f"how much is {p}% of {x}"])
    if kind == 1:
        x, a, b = r(-9, 15), r(2, 9), r(1, 30)
        op = rng.choice(["+", "-"])
        cval = a * x + b if op == "+" else a * x - b
        return rng.choice([f"Solve for x: {a}x {op} {b} = {cval}", f"Find x if {a}x {op} {b} = {cval}. Show your steps."])
    if kind == 2:
        t, v = r(2, 6), r(4, 12) * 10
        unit = rng.choice(["km", "miles"])
        return rng.choice([f"A car drives {t * v} {unit} in {t} hours. What is its average speed?",
                           f"If a bus travels at {v} {unit} per hour, how far does it go in {t} hours?",
                           f"How long does it take to travel {t * v} {unit} at {v} {unit} per hour?"])
    if kind == 3:
        price, off = r(2, 30) * 5, rng.choice([10, 15, 20, 30, 40, 50])
        item = rng.choice(["jacket", "pair of shoes", "lamp", "backpack", "video game", "watch"])
        return f"A {item} costs ${price} and is on sale for {off}% off. How much does it cost now?"
    if kind == 4:
        w, h = r(2, 20), r(2, 20)
        return rng.choice([f"What is the area of a rectangle that is {w} m wide and {h} m long?",
                           f"What is the perimeter of a rectangle with sides {w} cm and {h} cm?",
                           f"Find the area of a triangle with a base of {w} cm and a height of {h} cm.",
                           f"What is the circumference of a circle with a diameter of {w} cm?"])
    if kind == 5:
        n, each, paid = r(2, 9), r(2, 15), 0
        paid = rng.choice([50, 100]) if n * each < 50 else 100 if n * each < 100 else 200
        thing = rng.choice(["notebooks", "coffees", "movie tickets", "sandwiches", "plants"])
        return f"{name} buys {n} {thing} for ${each} each and pays with a ${paid} bill. How much change does {name} get?"
    if kind == 6:
        nums = [r(1, 100) for _ in range(r(4, 7))]
        what = rng.choice(["mean", "median", "average", "range"])
        return f"What is the {what} of these numbers: {', '.join(map(str, nums))}?"
    if kind == 7:
        a, b, cc, d = r(1, 7), r(2, 9), r(1, 7), r(2, 9)
        op = rng.choice(["+", "-", "×"])
        return rng.choice([f"What is {a}/{b} {op} {cc}/{d}?", f"Calculate {a}/{b} {op} {cc}/{d} and simplify the result."])
    if kind == 8:
        v = r(2, 250)
        conv = rng.choice([("kilometers", "miles"), ("kilograms", "pounds"), ("minutes", "hours"),
                           ("liters", "milliliters"), ("inches", "centimeters"), ("degrees Celsius", "Fahrenheit")])
        return f"Convert {v} {conv[0]} to {conv[1]}."
    if kind == 9:
        p, rate, yrs = r(5, 50) * 100, rng.choice([2, 3, 4, 5, 6, 8]), r(2, 10)
        kind_i = rng.choice(["simple", "compound"])
        return f"How much {kind_i} interest do I earn on ${p} at {rate}% per year after {yrs} years?"
    if kind == 10:
        a, b = r(2, 30) * r(1, 6), r(2, 30) * r(1, 6)
        return rng.choice([f"What is the greatest common divisor of {a} and {b}?",
                           f"Find the least common multiple of {a} and {b}.",
                           f"Explain how to find the LCM of {a} and {b}."])
    if kind == 11:
        n = r(20, 400)
        return rng.choice([f"Is {n} a prime number?", f"What are the prime factors of {n}?",
                           f"List all the factors of {n}."])
    if kind == 12:
        start, step = r(1, 20), r(2, 9)
        seq = [start + i * step for i in range(5)] if rng.random() < 0.5 else [start * step ** i for i in range(4)]
        return f"What is the next number in the sequence {', '.join(map(str, seq))}, ...? Explain the pattern."
    if kind == 13:
        red, blue = r(2, 12), r(2, 12)
        return rng.choice([f"A bag has {red} red marbles and {blue} blue marbles. If I pick one at random, what is "
                           f"the probability it is red?",
                           f"What is the probability of rolling a sum of {r(2, 12)} with two dice?",
                           f"If I flip a coin {r(2, 5)} times, what is the probability of getting all heads?"])
    if kind == 14:
        h, m, d = r(1, 11), rng.choice([0, 15, 20, 30, 45]), r(70, 190)
        return f"A movie starts at {h}:{m:02d} pm and lasts {d} minutes. What time does it end?"
    if kind == 15:
        serves, want, flour = r(2, 6), r(6, 16), r(1, 4)
        return f"A recipe for {serves} people needs {flour} cups of flour. How much flour do I need for {want} people?"
    if kind == 16:
        total, (a, b) = r(3, 40) * 60, rng.sample(range(1, 8), 2)
        return f"{name} and {name2} share ${total} in the ratio {a}:{b}. How much does each person get?"
    if kind == 17:
        a = r(2, 30)
        return rng.choice([f"What is {a} squared?", f"What is the square root of {a * a}?", f"What is {a} cubed?",
                           f"What is 2 to the power of {r(3, 12)}?"])
    if kind == 18:
        a, b, cc = r(12, 999), r(2, 99), r(1, 500)
        return rng.choice([f"What is {a} × {b}?", f"Calculate {a} * {b} - {cc}.", f"What is {a * b} divided by {b}?",
                           f"Compute {a} + {b} × {cc} and explain the order of operations."])
    if kind == 19:
        age, diff, later = r(5, 20), r(2, 9), r(2, 10)
        return f"{name} is {diff} years older than {name2}. In {later} years, the sum of their ages will be " \
               f"{2 * age + diff + 2 * later}. How old is {name2} now?"
    if kind == 20:
        workers, days = r(2, 6), r(4, 12)
        return f"If {workers} workers can paint a house in {days} days, how long would it take {workers * 2} workers?"
    budget, spent = r(20, 90) * 10, r(3, 15) * 10
    return f"{name} has a monthly budget of {_money(rng, budget, budget)} and has already spent ${spent} on food " \
           f"and ${spent // 2} on transport. What percentage of the budget is left?"


_SQL_DOMAINS: dict[str, dict[str, tuple[str, ...]]] = {
    "shop": {"customers": ("id", "name", "email", "city", "signup_date"),
             "orders": ("id", "customer_id", "order_date", "total_amount", "status"),
             "products": ("id", "name", "category", "price", "stock")},
    "school": {"students": ("id", "first_name", "last_name", "birth_date", "class_id"),
               "classes": ("id", "name", "teacher_id"),
               "teachers": ("id", "name", "subject", "hire_date"),
               "grades": ("id", "student_id", "course", "score", "exam_date")},
    "library": {"books": ("id", "title", "author_id", "genre", "published_year"),
                "authors": ("id", "name", "country"),
                "loans": ("id", "book_id", "member_id", "loan_date", "return_date"),
                "members": ("id", "name", "joined_at")},
    "hr": {"staff": ("id", "name", "department_id", "salary", "hire_date", "manager_id"),
           "departments": ("id", "name", "location"),
           "projects": ("id", "name", "budget", "start_date")},
    "clinic": {"patients": ("id", "name", "birth_date", "city"),
               "doctors": ("id", "name", "specialty"),
               "appointments": ("id", "patient_id", "doctor_id", "scheduled_at", "fee")},
    "music": {"artists": ("id", "name", "country"),
              "albums": ("id", "artist_id", "title", "release_year"),
              "tracks": ("id", "album_id", "title", "duration_seconds", "plays")},
    "blog": {"users": ("id", "username", "created_at", "country"),
             "posts": ("id", "user_id", "title", "published_at", "views"),
             "comments": ("id", "post_id", "user_id", "body", "created_at")},
    "travel": {"flights": ("id", "origin", "destination", "departure_time", "price", "airline"),
               "bookings": ("id", "flight_id", "passenger_name", "booked_at", "seat_class")},
    "iot": {"sensors": ("id", "location", "sensor_type"),
            "readings": ("id", "sensor_id", "recorded_at", "reading_value")},
}
_NUMERIC = ("salary", "price", "total", "amount", "score", "budget", "stock", "views", "plays", "value", "duration",
            "fee", "year")
_DATE = ("date", "_at", "time")
_NOT_GROUPABLE = ("name", "title", "email", "username", "body", "passenger_name", "first_name", "last_name")


def _col_kind(col: str) -> str:
    if col == "id" or col.endswith("_id"):
        return "id"
    if any(d in col for d in _DATE):
        return "date"
    if any(n in col for n in _NUMERIC):
        return "num"
    return "text"


def _sql_type(col: str) -> str:
    if col.endswith("year"):
        return "INTEGER"
    return {"id": "INTEGER", "date": "TIMESTAMP", "num": "NUMERIC(10, 2)", "text": "VARCHAR(100)"}[_col_kind(col)]


def _gen_sql(rng: random.Random, c: _Corpora) -> str:
    domain = _SQL_DOMAINS[rng.choice(sorted(_SQL_DOMAINS))]
    tables = sorted(domain)
    t = rng.choice(tables)
    cols = domain[t]
    by_kind: dict[str, list[str]] = {}
    for col in cols:
        by_kind.setdefault(_col_kind(col), []).append(col)
    k, days = rng.choice([3, 5, 10]), rng.choice([7, 30, 90, 365])
    intents = [f"Write a CREATE TABLE statement for {t} with the columns listed above and sensible types.",
               f"Return {rng.choice([10, 20, 50])} rows of {t} per page, for page {rng.randint(2, 9)}.",
               f"Find the number of rows in {t}."]
    texts = by_kind.get("text", [])
    groups = [col for col in texts if col not in _NOT_GROUPABLE]
    if texts:
        text = rng.choice(texts)
        intents += [f"Find duplicate values of {text} in {t}.", f"Find all {t} where {text} is NULL or empty.",
                    f"List the {t} whose {text} starts with the letter {rng.choice('ABCDEGLMPRST')}."]
    if groups:
        group = rng.choice(groups)
        intents += [f"Count the number of {t} for each {group}.",
                    f"Which {group} has the most {t}?"]
    if "num" in by_kind:
        num = rng.choice(by_kind["num"])
        intents += [f"Write a query that lists all {t} where {num} is greater than {rng.randint(1, 500)}.",
                    f"Find the top {k} {t} by {num}.",
                    f"Find the {t} whose {num} is above the average."]
        if groups:
            intents += [f"Get the average {num} of {t} grouped by {group}, sorted from highest to lowest.",
                        f"For each {group}, rank the {t} by {num} using a window function.",
                        f"Write an UPDATE statement that increases {num} by {rng.choice([5, 10, 15])}% for every "
                        f"row in {t} where {group} equals a given value."]
    if "date" in by_kind:
        date = rng.choice(by_kind["date"])
        intents += [f"Return the {t} whose {date} is within the last {days} days.",
                    f"Which index would speed up queries on {t} that filter by {date}? Write the statement.",
                    f"Delete all rows from {t} where {date} is before {rng.randint(2015, 2023)}-01-01.",
                    f"Count the {t} per month based on {date}."]
        if "num" in by_kind:
            intents.append(f"Show the total {num} per month based on {date}.")
    fks = [(col, col[:-3]) for col in cols if col.endswith("_id")]
    fks = [(col, tb) for col, ref in fks for tb in tables if tb.rstrip("s") == ref or tb == ref + "s"]
    if fks:
        col, ref = rng.choice(fks)
        intents += [f"Join {t} with {ref} and list every row of {ref} together with the number of matching {t}, "
                    f"including those with none.",
                    f"Find the rows of {ref} that have no matching rows in {t}."]
    intent = rng.choice(intents)
    style = rng.randint(0, 2)
    shown = rng.sample(tables, min(len(tables), rng.randint(1, 3)))
    if t not in shown:
        shown.append(t)
    shown = [x for x in tables if x in shown]
    if style == 0:
        schema = "\n".join(f"{x}({', '.join(domain[x])})" for x in shown)
    elif style == 1:
        schema = "\n".join(f"CREATE TABLE {x} (\n" + ",\n".join(f"  {col} {_sql_type(col)}" for col in domain[x])
                           + "\n);" for x in shown)
    else:
        schema = "\n".join(f"Table {x} has columns: {', '.join(domain[x])}." for x in shown)
    dialect = rng.choice(_SLOTS["dialect"])
    framing = rng.randint(0, 4)
    if framing == 0:
        return f"Given this schema:\n\n{schema}\n\n{intent}"
    if framing == 1:
        return f"Schema:\n{schema}\n\nTask: {intent} Use {dialect}."
    if framing == 2:
        return f"{intent}\n\nTables:\n{schema}"
    if framing == 3:
        return f"I'm using {dialect}. {intent} My tables look like this:\n\n{schema}"
    a, b = rng.sample([col for col in cols if col != "id"], 2)
    broken = rng.choice([f"SELECT {a}, COUNT(*) FROM {t};", f"SELECT * FROM {t} WHERE {a} = NULL;",
                         f"SELECT {a}, MAX({b}) FROM {t} GROUP BY {b};",
                         f"SELECT * FROM {t} ORDER BY {a} DESC LIMIT;",
                         f"SELECT {a} FROM {t} WHERE COUNT(*) > 1 GROUP BY {a};",
                         f"SELECT {a} {b} FROM {t} WHERE {a} = '{rng.choice(['x', 'test', 'new'])}"])
    return f"Why doesn't this query work, and how do I fix it?\n\n{broken}\n\nTable: {t}({', '.join(cols)})"


_TOOLS: tuple[tuple[str, str, dict[str, str], tuple[str, ...]], ...] = (
    ("get_weather", "Get the current weather for a city",
     {"city": "string", "unit": "string (celsius or fahrenheit)"},
     ("What's the weather like in {city} right now?", "Is it cold in {city} today? Answer in fahrenheit.")),
    ("search_flights", "Search flights between two cities on a date",
     {"origin": "string", "destination": "string", "date": "string (YYYY-MM-DD)", "passengers": "integer"},
     ("Find me a flight from {city} to {city2} on 2025-0{num_small}-1{num_small2} for {num_small3} people",)),
    ("create_event", "Create a calendar event",
     {"title": "string", "start": "string (ISO 8601)", "duration_minutes": "integer"},
     ("Put a 30-minute meeting called 'Budget review' on my calendar for next {weekday} at 9am",
      "Schedule lunch with {person} on {weekday} at noon for an hour")),
    ("send_message", "Send a text message to a contact", {"recipient": "string", "text": "string"},
     ("Text {person} that I'll be {num_small} minutes late", "Tell {person} I'm at the station")),
    ("convert_currency", "Convert an amount between currencies",
     {"amount": "number", "from_currency": "string", "to_currency": "string"},
     ("How much is 250 euros in US dollars?", "Convert 1200 yen to pounds")),
    ("get_stock_price", "Get the latest price of a stock", {"symbol": "string"},
     ("What's Microsoft trading at?", "How much is one share of Tesla right now?")),
    ("add_todo", "Add an item to the to-do list",
     {"task": "string", "due_date": "string (YYYY-MM-DD)", "priority": "string (low, medium, high)"},
     ("Remind me to renew my passport by 2025-03-01, it's high priority", "Add 'buy milk' to my list for today")),
    ("play_music", "Play music", {"query": "string", "shuffle": "boolean"},
     ("Play some jazz, shuffled", "Put on relaxing piano music")),
    ("get_directions", "Get directions between two places",
     {"origin": "string", "destination": "string", "mode": "string (driving, walking, transit)"},
     ("How do I get from the central station to the airport in {city} by train?",)),
    ("set_alarm", "Set an alarm", {"time": "string (HH:MM)", "label": "string"},
     ("Wake me up at 6:45 tomorrow", "Set an alarm for 14:00 called 'call {person}'")),
    ("lookup_order", "Look up the status of an order", {"order_id": "string"},
     ("Where is my order A-{num_small}{num_small2}81?",)),
    ("book_table", "Book a restaurant table",
     {"restaurant": "string", "party_size": "integer", "datetime": "string (ISO 8601)"},
     ("Book a table for {num_small} at Luigi's this {weekday} at 7pm",)),
    ("get_news", "Get news headlines", {"topic": "string", "max_results": "integer"},
     ("Show me the latest {num_small} headlines about renewable energy",)),
    ("set_thermostat", "Set the temperature in a room", {"room": "string", "temperature_c": "number"},
     ("Set the living room to 21 degrees", "Make the bedroom a bit warmer, like 23")),
    ("search_recipes", "Find recipes", {"ingredients": "array of strings", "max_minutes": "integer"},
     ("What can I cook with rice and spinach in under 30 minutes?",)),
    ("create_invoice", "Create an invoice",
     {"customer": "string", "amount": "number", "due_date": "string (YYYY-MM-DD)"},
     ("Invoice {person} for $480, due at the end of next month",)),
)
_REST = (
    ("POST", "/api/v1/tasks", {"title": "string", "due": "string (YYYY-MM-DD)"}, "create a task called 'Call the bank'"),
    ("PATCH", "/api/v1/users/{id}", {"email": "string"}, "change the email of user 42 to new@example.com"),
    ("DELETE", "/api/v1/comments/{id}", {}, "delete comment 981"),
    ("GET", "/api/v1/products?category={category}&limit={n}", {}, "get the first 20 products in the 'garden' category"),
    ("POST", "/api/v1/tickets", {"subject": "string", "priority": "string"}, "open a high-priority support ticket"),
    ("PUT", "/api/v1/settings/notifications", {"email": "boolean", "sms": "boolean"}, "turn off SMS notifications"),
    ("POST", "/api/v1/bookings", {"room_id": "integer", "nights": "integer"}, "book room 12 for three nights"),
    ("GET", "/api/v1/orders/{id}/status", {}, "check the status of order 7731"),
)


def _tool_spec(name: str, desc: str, params: dict[str, str], rng: random.Random) -> str:
    spec = {"name": name, "description": desc, "parameters": params}
    return json.dumps(spec, indent=2) if rng.random() < 0.4 else json.dumps(spec)


def _gen_api(rng: random.Random, c: _Corpora) -> str:
    kind = rng.randint(0, 5)
    if kind <= 2:
        name, desc, params, reqs = rng.choice(_TOOLS)
        req = _fill(rng.choice(reqs), rng)
        if kind == 0:
            return f"You have access to this function:\n\n{_tool_spec(name, desc, params, rng)}\n\nUser: {req}\n" \
                   + rng.choice(["Reply with the JSON function call only.", "Return the call as JSON.",
                                 "What function call should be made? Answer in JSON."])
        if kind == 1:
            other = rng.choice([t for t in _TOOLS if t[0] != name])
            specs = [_tool_spec(name, desc, params, rng), _tool_spec(other[0], other[1], other[2], rng)]
            rng.shuffle(specs)
            return "Tools available:\n" + "\n".join(specs) + f"\n\nWhich tool should be called for \"{req}\"? " \
                   "Give the call as JSON with all arguments."
        sig = ", ".join(f"{k}: {v.split(' ')[0]}" for k, v in params.items())
        return f"Available tool: {name}({sig}) - {desc}. The user says: \"{req}\". Write the tool call."
    if kind <= 4:
        method, path, body, action = rng.choice(_REST)
        lang = rng.choice(["curl", "Python with requests", "JavaScript fetch", "Go net/http"])
        desc = f"{method} {path}" + (f"\nBody: {json.dumps(body)}" if body else "")
        auth = rng.choice(["", " The API needs a bearer token in the Authorization header.",
                           " Base URL: https://api.example.com."])
        return f"Using this API endpoint, write a {lang} request to {action}.{auth}\n\n{desc}"
    status, msg = rng.choice([(400, "Missing required field 'email'"), (401, "Token expired"),
                              (403, "You do not have permission to delete this project"),
                              (404, f"No customer with id {rng.randint(100, 9999)}"),
                              (409, "A user with this email already exists"),
                              (422, "Invalid date format, expected YYYY-MM-DD"),
                              (429, f"Rate limit exceeded, retry after {rng.choice([10, 30, 60])} seconds"),
                              (500, "Internal server error"), (503, "Service temporarily unavailable")])
    resp = json.dumps({"status": status, "error": {"code": status, "message": msg}})
    return rng.choice([f"Explain this API response and what I should do next:\n\n{resp}",
                       f"My request returned this. What went wrong?\n\n{resp}"])


def _gen_api_stdlib(rng: random.Random, c: _Corpora) -> str:
    f = rng.choice(c.api_funcs)
    spec = {"name": f"{f.module}.{f.name}", "description": f.doc_first, "parameters": dict(f.params)}
    return rng.choice([
        f"Here is a function description:\n\n{json.dumps(spec)}\n\nWrite an example call as JSON with realistic "
        f"arguments.",
        f"Given this API description, write Python code that calls it correctly:\n\n{json.dumps(spec, indent=2)}",
        f"Describe in plain words what arguments this function expects:\n\n{json.dumps(spec)}",
    ])


_ANY_PARTIES = (("Company", "Contractor"), ("Client", "Consultant"), ("Licensor", "Licensee"),
                ("Provider", "Customer"), ("Employer", "Employee"), ("Seller", "Buyer"))
_SERVICE_PARTIES = (("Company", "Contractor"), ("Client", "Consultant"), ("Client", "Agency"))
_CLAUSES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("The {B} shall pay the {A} the sum of {amount} within {days} days of receipt of a valid invoice. Late payments "
     "shall bear interest at {rate}% per month.", (("Contractor", "Client"), ("Consultant", "Company"))),
    ("Either party may terminate this Agreement for convenience upon {days} days' prior written notice to the other "
     "party.", _ANY_PARTIES),
    ("The {B} shall indemnify and hold harmless the {A} from and against any and all claims, damages and expenses "
     "arising out of the {B}'s negligence or breach of this Agreement.", _SERVICE_PARTIES),
    ("This Agreement shall be governed by and construed in accordance with the laws of {jurisdiction}, without "
     "regard to its conflict of laws principles.", _ANY_PARTIES),
    ("For a period of {months} months following the termination of this Agreement, the {B} shall not solicit any "
     "employee of the {A}.", _SERVICE_PARTIES + (("Employer", "Employee"),)),
    ("Each party shall keep confidential all Confidential Information received from the other party and shall not "
     "disclose it to any third party for a period of {years} years.", _ANY_PARTIES),
    ("The {A}'s total liability under this Agreement shall not exceed the amounts paid by the {B} in the {months} "
     "months preceding the claim.", (("Provider", "Customer"), ("Licensor", "Licensee"), ("Contractor", "Client"))),
    ("Any dispute arising out of or relating to this Agreement shall be finally settled by binding arbitration in "
     "{city}.", _ANY_PARTIES),
    ("The {B} may not assign or transfer any of its rights under this Agreement without the prior written consent "
     "of the {A}.", _ANY_PARTIES),
    ("All intellectual property rights in any work product created by the {B} under this Agreement shall vest in "
     "the {A} upon payment in full.", _SERVICE_PARTIES),
    ("The {A} warrants that the goods will be free from material defects for a period of {months} months from the "
     "date of delivery.", (("Seller", "Buyer"), ("Supplier", "Purchaser"))),
    ("Neither party shall be liable for any delay or failure to perform caused by events beyond its reasonable "
     "control, including fire, flood, strike or epidemic.", _ANY_PARTIES),
    ("If any provision of this Agreement is held invalid or unenforceable, the remaining provisions shall continue "
     "in full force and effect.", _ANY_PARTIES),
    ("This Agreement shall automatically renew for successive {years}-year terms unless either party gives notice "
     "of non-renewal at least {days} days before the end of the current term.",
     (("Provider", "Customer"), ("Licensor", "Licensee"))),
    ("The {B} shall maintain general liability insurance with coverage of at least {amount} per occurrence during "
     "the term of this Agreement.", (("Company", "Contractor"), ("Landlord", "Tenant"))),
    ("A security deposit of {amount} shall be returned to the {B} within {days} days after the end of the lease, "
     "less any deductions for damage beyond normal wear and tear.", (("Landlord", "Tenant"),)),
    ("The {B} shall not sublet the property or keep pets on the premises without the {A}'s prior written approval.",
     (("Landlord", "Tenant"),)),
    ("The {B} shall work {hours} hours per week and is entitled to {leave} days of paid annual leave.",
     (("Employer", "Employee"),)),
)


def _gen_legal_clause(rng: random.Random, c: _Corpora) -> str:
    template, parties = rng.choice(_CLAUSES)
    a, b = rng.choice(parties)
    clause = template.format(
        A=a, B=b, amount=f"${rng.choice([500, 1000, 2500, 5000, 10000, 250000])}", days=rng.choice([10, 14, 30, 45, 60]),
        rate=rng.choice([1, 1.5, 2]), months=rng.choice([3, 6, 12, 24]), years=rng.choice([1, 2, 3, 5]),
        jurisdiction=rng.choice(_SLOTS["jurisdiction"]), city=rng.choice(_SLOTS["city"]),
        hours=rng.choice([20, 30, 37.5, 40]), leave=rng.choice([20, 25, 28, 30]))
    return rng.choice([
        f"Explain this clause in plain English:\n\n{clause}", f"Rewrite this clause in simpler language:\n\n\"{clause}\"",
        f"Is this clause fair to the {b}? Explain briefly.\n\n{clause}",
        f"What are the risks of this clause for the {b}?\n\n{clause}",
        f"Summarize this contract clause in one sentence: {clause}",
        f"Suggest changes to make this clause more favorable to the {b}:\n\n{clause}",
        f"What type of clause is this, and what is its purpose?\n\n{clause}",
    ])


def _gen_legal_license(rng: random.Random, c: _Corpora) -> str:
    para = rng.choice(c.license_paras)
    head = rng.choice([
        "Explain this license text in plain English:",
        "What does this software license paragraph require from someone who redistributes the software?",
        "Summarize the following license terms in two sentences:",
        "Does the following license text allow commercial use? Explain your reasoning.",
        "Rewrite this license clause so that a non-lawyer can understand it:",
        "What warranty, if any, does this text give?",
        "List the conditions in this license text as bullet points:",
    ])
    return f"{head}\n\n{para}"


def _gen_cs_email(rng: random.Random, c: _Corpora) -> str:
    greet = rng.choice(["Hi,", "Hello,", "Dear support team,", "Hey,", "Good afternoon,"])
    email = _fill(f"{greet}\n\nI ordered a {{cs_product}} {{time_ago}} (order #{rng.randint(10000, 99999)}) and "
                  "{cs_problem}. {cs_extra}\n\n{person}", rng)
    email = re.sub(r" +\n", "\n", email)
    return _fill(rng.choice([
        "Reply politely to this customer email:\n\n", "Write a response to this complaint that offers {remedy}:\n\n",
        "Classify this support ticket as billing, shipping, technical or other, and draft a short reply:\n\n",
        "Summarize this customer's problem in one line and suggest next steps:\n\n",
        "Draft an empathetic reply to this message:\n\n",
    ]), rng) + email


_Entry = tuple[str, float, _Gen, str | None]  # (source, weight, generator, corpus key it needs)

_GENERATORS: dict[str, tuple[_Entry, ...]] = {
    "code": (("template", 0.45, _from_templates("code"), None), ("template", 0.1, _gen_code_loop, None),
             ("stdlib", 0.45, _gen_code_stdlib, "functions")),
    "creative_writing": (("template", 1.0, _from_templates("creative_writing"), None),),
    "summarization": (("template", 0.45, _from_templates("summarization"), None),
                      ("stdlib", 0.25, _gen_summ_stdlib, "module_docs"),
                      ("usr_share_doc", 0.15, _gen_summ_readme, "readme_chunks"),
                      ("usr_share_doc", 0.15, _gen_summ_changelog, "changelog_entries")),
    "qa": (("template", 0.8, _from_templates("qa"), None), ("stdlib", 0.2, _gen_qa_stdlib, "module_docs")),
    "translation": (("template", 0.7, _from_templates("translation"), None),
                    ("template", 0.15, _gen_translation_foreign, None),
                    ("stdlib", 0.15, _gen_translation_stdlib, "sentences")),
    "math": (("template", 1.0, _gen_math, None),),
    "sql": (("template", 0.8, _gen_sql, None), ("template", 0.2, _from_templates("sql"), None)),
    "api_call": (("template", 0.65, _gen_api, None), ("template", 0.15, _from_templates("api_call"), None),
                 ("stdlib", 0.2, _gen_api_stdlib, "api_funcs")),
    "legal": (("template", 0.4, _gen_legal_clause, None), ("template", 0.3, _from_templates("legal"), None),
              ("usr_share_doc", 0.3, _gen_legal_license, "license_paras")),
    "customer_support": (("template", 0.6, _from_templates("customer_support"), None),
                         ("template", 0.4, _gen_cs_email, None)),
}


# --------------------------------------------------------------------------------------
# Eval exclusion and the public API.
# --------------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def _eval_keys() -> tuple[str, ...]:
    return tuple(_norm(p.prompt) for p in builtin_prompts("eval"))


def _hits_eval(key: str, eval_keys: Iterable[str]) -> bool:
    """True if the (normalized) candidate equals or contains an eval prompt."""
    return any(e in key for e in eval_keys)


def _generate(n_per_task: int, seed: int) -> tuple[list[tuple[Prompt, str]], _Corpora, int]:
    """(prompt, source) pairs for every task, the corpora used, and how many eval collisions were dropped."""
    if not isinstance(n_per_task, int) or isinstance(n_per_task, bool) or n_per_task < 0:
        raise SpecDeployError(f"n_per_task must be an integer >= 0, got {n_per_task!r}")
    eval_keys = _eval_keys()
    corpora = _load_corpora(n_per_task, seed)
    out: list[tuple[Prompt, str]] = []
    seen: set[str] = set()
    dropped = 0
    for task in TASKS:
        entries = [e for e in _GENERATORS[task] if corpora.has(e[3])]
        weights = [e[1] for e in entries]
        rng = random.Random(f"specdeploy-train:{seed}:{task}")
        got, attempts, max_attempts = 0, 0, 200 + 50 * n_per_task
        while got < n_per_task and attempts < max_attempts:
            attempts += 1
            source, _, gen, _ = rng.choices(entries, weights)[0]
            text = gen(rng, corpora)
            if not text or not text.strip():
                continue
            text = text.strip()
            key = _norm(text)
            if key in seen:
                continue
            seen.add(key)
            if _hits_eval(key, eval_keys):
                dropped += 1
                continue
            out.append((Prompt(task=task, prompt=text), source))
            got += 1
        if got < n_per_task:
            raise SpecDeployError(f"only {got} distinct training prompts could be generated for task {task!r} "
                                  f"(asked for {n_per_task}); use a smaller n_per_task")
    bad = [p.prompt[:60] for p, _ in out if _hits_eval(_norm(p.prompt), eval_keys)]
    if bad:
        raise AssertionError(f"training prompts overlap the eval set: {bad[:3]}")
    return out, corpora, dropped


def training_prompts(n_per_task: int, seed: int = 0) -> list[Prompt]:
    """`n_per_task` distinct training prompts for each task in TASKS (grouped by task, in TASKS order).

    Deterministic for (n_per_task, seed) on a given machine; never equal to, nor containing, an eval prompt.
    """
    return [p for p, _ in _generate(n_per_task, seed)[0]]


def _template_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in TASKS:
        n = 0
        for source, _, gen, _ in _GENERATORS[task]:
            if source == "template":
                n += getattr(gen, "n_templates", 1)
        counts[task] = n
    return counts


def build_manifest_sources(n_per_task: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Which offline sources exist and were used, with counts, for a training manifest.

    With `n_per_task`, also regenerates `training_prompts(n_per_task, seed)` and records, per task,
    how many prompts came from each source and how many eval collisions were filtered out.
    """
    docs = _doc_files()
    manifest: dict[str, Any] = {
        "generator": "specdeploy.training.prompt_sources",
        "tasks": list(TASKS),
        "sources": list(SOURCES),
        "template": {"templates_and_generators_per_task": _template_counts(), "slot_pools": len(_SLOTS)},
        "stdlib": {"root": str(_stdlib_root()), "python": sys.version.split()[0],
                   "files_available": len(_stdlib_files())},
        "usr_share_doc": {"root": str(DOC_ROOT), "present": DOC_ROOT.is_dir(),
                          "copyright_files_available": len(docs["copyright"]),
                          "readme_files_available": len(docs["readme"]),
                          "changelog_files_available": len(docs["changelog"])},
        "eval_exclusion": {"eval_prompts": len(_eval_keys()),
                           "rule": "no training prompt equals or contains an eval prompt "
                                   "(case- and whitespace-insensitive)"},
    }
    if n_per_task is None:
        return manifest
    pairs, corpora, dropped = _generate(n_per_task, seed)
    manifest["stdlib"].update(corpora.stats["stdlib"])
    manifest["usr_share_doc"].update(corpora.stats["usr_share_doc"])
    per_task: dict[str, dict[str, int]] = {t: {} for t in TASKS}
    for p, source in pairs:
        per_task[p.task][source] = per_task[p.task].get(source, 0) + 1
    manifest["seed"] = seed
    manifest["n_per_task"] = n_per_task
    manifest["total_prompts"] = len(pairs)
    manifest["prompts_per_task_per_source"] = per_task
    manifest["prompts_per_source"] = dict(Counter(source for _, source in pairs))
    manifest["eval_exclusion"]["candidates_dropped"] = dropped
    return manifest
