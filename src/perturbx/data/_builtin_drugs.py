"""A built-in library of well-known drugs (name, SMILES) for the simulator.

Written for this package from standard chemical structures; it spans many classes (kinase
inhibitors, HDAC inhibitors, nucleoside analogues, steroids, NSAIDs, CNS drugs, antibiotics,
natural products) so that structure-driven simulated effects are diverse.
"""

from __future__ import annotations

#: ``(name, SMILES)`` pairs; every SMILES parses in RDKit (checked by the tests).
BUILTIN_DRUGS: tuple[tuple[str, str], ...] = (
    ("Aspirin", "CC(=O)Oc1ccccc1C(=O)O"),
    ("Caffeine", "Cn1cnc2c1c(=O)n(C)c(=O)n2C"),
    ("Ibuprofen", "CC(C)Cc1ccc(cc1)C(C)C(=O)O"),
    ("Paracetamol", "CC(=O)Nc1ccc(O)cc1"),
    ("Imatinib", "Cc1ccc(NC(=O)c2ccc(CN3CCN(C)CC3)cc2)cc1Nc1nccc(-c2cccnc2)n1"),
    ("Gefitinib", "COc1cc2ncnc(Nc3ccc(F)c(Cl)c3)c2cc1OCCCN1CCOCC1"),
    ("Erlotinib", "COCCOc1cc2ncnc(Nc3cccc(c3)C#C)c2cc1OCCOC"),
    ("Lapatinib", "CS(=O)(=O)CCNCc1ccc(o1)-c1ccc2ncnc(Nc3ccc(OCc4cccc(F)c4)c(Cl)c3)c2c1"),
    ("Sorafenib", "CNC(=O)c1cc(Oc2ccc(NC(=O)Nc3ccc(Cl)c(C(F)(F)F)c3)cc2)ccn1"),
    ("Dasatinib", "Cc1nc(Nc2ncc(s2)C(=O)Nc2c(C)cccc2Cl)cc(n1)N1CCN(CCO)CC1"),
    ("Vemurafenib", "CCCS(=O)(=O)Nc1ccc(F)c(C(=O)c2c[nH]c3ncc(cc23)-c2ccc(Cl)cc2)c1F"),
    ("Ruxolitinib", "N#CC[C@H](C1CCCC1)n1cc(cn1)-c1ncnc2[nH]ccc12"),
    ("Tofacitinib", "C[C@@H]1CCN(C[C@@H]1N(C)c1ncnc2[nH]ccc12)C(=O)CC#N"),
    ("Palbociclib", "CC(=O)c1c(C)c2cnc(Nc3ccc(cn3)N3CCNCC3)nc2n(C2CCCC2)c1=O"),
    ("Olaparib", "O=C(c1cc(Cc2n[nH]c(=O)c3ccccc23)ccc1F)N1CCN(CC1)C(=O)C1CC1"),
    ("Bortezomib", "CC(C)C[C@H](NC(=O)[C@H](Cc1ccccc1)NC(=O)c1cnccn1)B(O)O"),
    ("Vorinostat", "ONC(=O)CCCCCCC(=O)Nc1ccccc1"),
    ("Panobinostat", "Cc1[nH]c2ccccc2c1CCNCc1ccc(/C=C/C(=O)NO)cc1"),
    ("Entinostat", "Nc1ccccc1NC(=O)c1ccc(CNC(=O)OCc2cccnc2)cc1"),
    ("Trichostatin A", "C[C@H](/C=C(\\C)/C=C/C(=O)NO)C(=O)c1ccc(N(C)C)cc1"),
    ("JQ1", "Cc1sc2c(c1C)C(c1ccc(Cl)cc1)=N[C@@H](CC(=O)OC(C)(C)C)c1nnc(C)n1-2"),
    ("Methotrexate", "CN(Cc1cnc2nc(N)nc(N)c2n1)c1ccc(cc1)C(=O)N[C@@H](CCC(=O)O)C(=O)O"),
    ("Fluorouracil", "O=c1[nH]cc(F)c(=O)[nH]1"),
    ("Gemcitabine", "Nc1ccn([C@@H]2O[C@H](CO)[C@@H](O)C2(F)F)c(=O)n1"),
    ("Cytarabine", "Nc1ccn([C@@H]2O[C@H](CO)[C@@H](O)[C@@H]2O)c(=O)n1"),
    ("Azacitidine", "Nc1ncn([C@@H]2O[C@H](CO)[C@@H](O)[C@H]2O)c(=O)n1"),
    ("Decitabine", "Nc1ncn([C@H]2C[C@H](O)[C@@H](CO)O2)c(=O)n1"),
    ("Hydroxyurea", "NC(=O)NO"),
    ("Camptothecin", "CC[C@@]1(O)C(=O)OCc2c1cc1-c3nc4ccccc4cc3Cn1c2=O"),
    ("Colchicine", "CC(=O)N[C@H]1CCc2cc(OC)c(OC)c(OC)c2-c2ccc(OC)c(=O)cc12"),
    ("Nocodazole", "COC(=O)Nc1nc2cc(C(=O)c3cccs3)ccc2[nH]1"),
    (
        "Doxorubicin",
        "COc1cccc2c1C(=O)c1c(O)c3c(c(O)c1C2=O)C[C@@](O)(C(=O)CO)C[C@@H]3"
        "O[C@H]1C[C@H](N)[C@H](O)[C@H](C)O1",
    ),
    ("Tamoxifen", "CC/C(=C(\\c1ccccc1)c1ccc(OCCN(C)C)cc1)c1ccccc1"),
    ("Estradiol", "C[C@]12CC[C@H]3[C@@H](CCc4cc(O)ccc34)[C@@H]1CC[C@@H]2O"),
    (
        "Dexamethasone",
        "C[C@@H]1C[C@H]2[C@@H]3CCC4=CC(=O)C=C[C@]4(C)[C@@]3(F)[C@@H](O)C[C@]2(C)[C@@]1(O)C(=O)CO",
    ),
    ("Celecoxib", "Cc1ccc(cc1)-c1cc(nn1-c1ccc(cc1)S(N)(=O)=O)C(F)(F)F"),
    ("Diclofenac", "OC(=O)Cc1ccccc1Nc1c(Cl)cccc1Cl"),
    ("Naproxen", "COc1ccc2cc([C@H](C)C(=O)O)ccc2c1"),
    (
        "Atorvastatin",
        "CC(C)c1c(C(=O)Nc2ccccc2)c(-c2ccccc2)c(-c2ccc(F)cc2)n1CC[C@@H](O)C[C@@H](O)CC(=O)O",
    ),
    (
        "Simvastatin",
        "CCC(C)(C)C(=O)O[C@H]1C[C@@H](C)C=C2C=C[C@H](C)[C@H](CC[C@@H]3C[C@@H](O)CC(=O)O3)[C@@H]12",
    ),
    ("Metformin", "CN(C)C(=N)NC(=N)N"),
    ("Fluoxetine", "CNCCC(Oc1ccc(cc1)C(F)(F)F)c1ccccc1"),
    ("Haloperidol", "OC1(CCN(CCCC(=O)c2ccc(F)cc2)CC1)c1ccc(Cl)cc1"),
    ("Diazepam", "CN1C(=O)CN=C(c2ccccc2)c2cc(Cl)ccc12"),
    ("Chlorpromazine", "CN(C)CCCN1c2ccccc2Sc2ccc(Cl)cc12"),
    ("Morphine", "CN1CC[C@]23c4c5ccc(O)c4O[C@H]2[C@@H](O)C=C[C@H]3[C@H]1C5"),
    ("Nicotine", "CN1CCC[C@H]1c1cccnc1"),
    ("Omeprazole", "COc1ccc2[nH]c(nc2c1)S(=O)Cc1ncc(C)c(OC)c1C"),
    ("Sildenafil", "CCCc1nn(C)c2c1nc([nH]c2=O)-c1cc(ccc1OCC)S(=O)(=O)N1CCN(C)CC1"),
    ("Warfarin", "CC(=O)CC(c1ccccc1)c1c(O)c2ccccc2oc1=O"),
    ("Ciprofloxacin", "OC(=O)c1cn(C2CC2)c2cc(N3CCNCC3)c(F)cc2c1=O"),
    ("Chloroquine", "CCN(CC)CCCC(C)Nc1ccnc2cc(Cl)ccc12"),
    ("Metronidazole", "Cc1ncc([N+](=O)[O-])n1CCO"),
    ("Propranolol", "CC(C)NCC(O)COc1cccc2ccccc12"),
    ("Lidocaine", "CCN(CC)CC(=O)Nc1c(C)cccc1C"),
    ("Resveratrol", "Oc1ccc(/C=C/c2cc(O)cc(O)c2)cc1"),
    ("Quercetin", "Oc1cc(O)c2c(c1)oc(-c1ccc(O)c(O)c1)c(O)c2=O"),
    ("Curcumin", "COc1cc(/C=C/C(=O)CC(=O)/C=C/c2ccc(O)c(OC)c2)ccc1O"),
)
