"""The built-in text `quantserve verify` measures on (and bench/perplexity.py): about 5 KB of
public-domain English prose, 1,074 tokens with the default model's tokenizer."""

# Public domain: the Gettysburg Address (1863), the opening of the Declaration of Independence
# (1776), and the opening paragraphs of A Tale of Two Cities (1859) and Pride and Prejudice (1813).
TEXT = """\
Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in Liberty, \
and dedicated to the proposition that all men are created equal.

Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so dedicated, \
can long endure. We are met on a great battle-field of that war. We have come to dedicate a portion of that field, \
as a final resting place for those who here gave their lives that that nation might live. It is altogether fitting \
and proper that we should do this.

But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this ground. The brave \
men, living and dead, who struggled here, have consecrated it, far above our poor power to add or detract. The world \
will little note, nor long remember what we say here, but it can never forget what they did here. It is for us the \
living, rather, to be dedicated here to the unfinished work which they who fought here have thus far so nobly \
advanced. It is rather for us to be here dedicated to the great task remaining before us -- that from these honored \
dead we take increased devotion to that cause for which they gave the last full measure of devotion -- that we here \
highly resolve that these dead shall not have died in vain -- that this nation, under God, shall have a new birth \
of freedom -- and that government of the people, by the people, for the people, shall not perish from the earth.

When in the Course of human events, it becomes necessary for one people to dissolve the political bands which have \
connected them with another, and to assume among the powers of the earth, the separate and equal station to which \
the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of mankind requires that they \
should declare the causes which impel them to the separation.

We hold these truths to be self-evident, that all men are created equal, that they are endowed by their Creator \
with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. That to secure \
these rights, Governments are instituted among Men, deriving their just powers from the consent of the governed, \
That whenever any Form of Government becomes destructive of these ends, it is the Right of the People to alter or \
to abolish it, and to institute new Government, laying its foundation on such principles and organizing its powers \
in such form, as to them shall seem most likely to effect their Safety and Happiness. Prudence, indeed, will \
dictate that Governments long established should not be changed for light and transient causes; and accordingly \
all experience hath shewn, that mankind are more disposed to suffer, while evils are sufferable, than to right \
themselves by abolishing the forms to which they are accustomed. But when a long train of abuses and usurpations, \
pursuing invariably the same Object evinces a design to reduce them under absolute Despotism, it is their right, \
it is their duty, to throw off such Government, and to provide new Guards for their future security.

It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it \
was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of \
Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing \
before us, we were all going direct to Heaven, we were all going direct the other way -- in short, the period was \
so far like the present period, that some of its noisiest authorities insisted on its being received, for good or \
for evil, in the superlative degree of comparison only.

There were a king with a large jaw and a queen with a plain face, on the throne of England; there were a king with \
a large jaw and a queen with a fair face, on the throne of France. In both countries it was clearer than crystal to \
the lords of the State preserves of loaves and fishes, that things in general were settled for ever.

It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a \
wife.

However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth \
is so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one \
or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"You want to tell me, and I have no objection to hearing it."

This was invitation enough.
"""

