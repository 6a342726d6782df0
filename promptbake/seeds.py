"""Built-in seed queries: diverse topics, so a baked behaviour generalises beyond any one of them."""

SEED_QUERIES = {
    "life advice": [
        "How do I stop procrastinating on important work?",
        "What should I consider before changing careers?",
        "How can I make friends in a new city?",
        "Any tips for staying motivated when learning something hard?",
        "How do I handle criticism at work without getting defensive?",
    ],
    "science": [
        "Why is the sky blue?",
        "How do vaccines train the immune system?",
        "What is a black hole?",
        "Why do we have seasons on Earth?",
        "How does photosynthesis work?",
    ],
    "technology": [
        "What is the difference between RAM and storage?",
        "How does the internet send a message from one computer to another?",
        "Should I learn Python or JavaScript first?",
        "What is machine learning, in simple terms?",
        "How do I keep my passwords safe?",
    ],
    "philosophy": [
        "What is the meaning of life?",
        "Is it ever right to lie?",
        "Do we have free will?",
        "What makes a person happy?",
        "Why do people disagree about what is fair?",
    ],
    "cooking": [
        "How do I cook perfect rice?",
        "What can I make for dinner with eggs, spinach and cheese?",
        "How do I keep bread fresh longer?",
        "What is the secret to a good tomato sauce?",
        "How do I bake chocolate chip cookies?",
    ],
    "relationships": [
        "How do I apologise to a friend I hurt?",
        "What makes a relationship last?",
        "How can I be a better listener?",
        "My roommate never cleans up. What should I do?",
        "How do I tell my family I want to move abroad?",
    ],
    "history": [
        "Why did the Roman Empire fall?",
        "Who built the pyramids of Giza?",
        "What started the First World War?",
        "What was the Silk Road?",
        "How did the printing press change the world?",
    ],
    "humour": [
        "Tell me a joke.",
        "What is the funniest animal?",
        "Write a short funny poem about a cat.",
        "Why did the chicken cross the road?",
        "Give me a pun about the ocean.",
    ],
    "health": [
        "How much water should I drink each day?",
        "What are good habits for better sleep?",
        "How can I start running if I have never exercised?",
        "Is breakfast really the most important meal?",
        "How do I reduce stress after a long day?",
    ],
    "education": [
        "What is the best way to study for an exam?",
        "How do I learn a new language quickly?",
        "Can you explain fractions to a child?",
        "How do I write a good essay?",
        "What are some tips for remembering what I read?",
    ],
    "travel": [
        "What should I pack for a week at the beach?",
        "How do I find cheap flights?",
        "What is worth seeing in Paris?",
        "How do I deal with jet lag?",
        "Is it safe to travel alone?",
    ],
    "small talk": [
        "Who are you?",
        "How are you today?",
        "What do you like to do for fun?",
        "What is your favourite colour?",
        "Tell me about yourself.",
    ],
}


def seed_queries() -> list[str]:
    """Interleaved across categories, so the first N queries already span every topic."""
    cats = list(SEED_QUERIES.values())
    return [cat[i] for i in range(max(map(len, cats))) for cat in cats if i < len(cat)]
